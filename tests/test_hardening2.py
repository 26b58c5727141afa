"""Hardening II: the I/O layer against hostile files and file systems.

Symlinks out of a model directory (never copied into an output), duplicate keys and
JSON bombs (one CheckpointError line, never RecursionError/ValueError), FIFOs and
devices (refused unopened: no hang), the Hugging Face hub cache layout (links into
../../blobs accepted, nothing else), the header cap and its parse cost, blocked pickles
named in one line, names escaped in messages, long output names, symlinked outputs,
created parents, SIGTERM and ENOSPC (nothing left behind).

Everything runs on private copies of the fixtures in tmp_path, offline. Every test
checks that its inputs are unchanged (hashed before and after) and that nothing is left
beside the output.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import surgery.io.index as index_mod
import surgery.io.writer as wmod
from helpers import FullDisk, raises_one_line
from helpers import tree_state as helpers_tree_state
from surgery.cli.main import cli
from surgery.errors import CheckpointError, OutputError, SurgeryError
from surgery.io import LazyReader, ShardedWriter, atomic_output_dir, escape_name, load_json, open_checkpoint
from surgery.io.guards import MAX_NUMBER_CHARS, check_regular, source_root
from surgery.io.safetensors_header import MAX_HEADER_BYTES
from surgery.io.writer import TMP_TAG, check_output_path

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not-for-outputs"


# ----------------------------------------------------------------------------- helpers


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line(r, needle: str | None = None) -> str:
    """exit 1, one 'error:' line on stderr, no traceback, no internal error."""
    assert r.exit_code == 1, f"exit {r.exit_code}: {r.output}"
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], r.stderr
    if needle:
        assert re.search(needle, lines[0]), lines[0]
    return lines[0]


def tree_state(*roots: Path) -> dict[str, str]:
    """helpers.tree_state with each regular file's mtime: an input rewritten with equal bytes shows."""
    return helpers_tree_state(*roots, mtime=True)


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def all_bytes(d: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file())


def no_hang(fn, fifos=(), timeout: float = 20.0):
    """Run fn in a thread; if it blocks (on a FIFO), unblock it and fail instead of hanging the suite."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for f in fifos:  # a writer on the FIFO lets the blocked open/read return
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(5)
        pytest.fail(f"blocked for over {timeout} s (reading a FIFO?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    d = tmp_path / "in"
    d.mkdir()
    out = {}
    for name in ("tiny-bert", "tiny-bert-lora", "tiny-llama", "tiny-llama-lora"):
        shutil.copytree(FIX / name, d / name)
        out[name] = d / name
    return out


def _pack(raw: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


def _header_file(path: Path, raw: bytes, data: bytes = b"") -> Path:
    path.write_bytes(_pack(raw, data))
    return path


# ----------------------------------------------------------------------------- 1. symlink leak


def _leaky_base(base: Path, tmp_path: Path) -> dict[str, Path]:
    """Side files a hostile (or careless) model directory can hold: links out of it, a FIFO,
    a sub-directory link out, a config sub-dir with a link out; and legitimate ones."""
    secret_dir = tmp_path / "home" / ".ssh"
    secret_dir.mkdir(parents=True)
    (secret_dir / "id_rsa").write_bytes(SECRET)
    (base / "notes.txt").symlink_to(secret_dir / "id_rsa")
    (base / "env.txt").symlink_to("/proc/self/environ")
    (base / "zero.txt").symlink_to("/dev/zero")
    (base / "rel_escape.json").symlink_to(Path("..") / ".." / "home" / ".ssh" / "id_rsa")
    os.mkfifo(base / "pipe.txt")
    (base / "dotssh").symlink_to(secret_dir, target_is_directory=True)
    (base / "2_Dense").mkdir()
    (base / "2_Dense" / "config.json").write_text("{}")
    (base / "2_Dense" / "key.json").symlink_to(secret_dir / "id_rsa")
    # legitimate: a link to a file of the same directory, and a config-only sub-dir
    (base / "vocab_alias.json").symlink_to("tokenizer.json")
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return {"secret": secret_dir / "id_rsa", "fifo": base / "pipe.txt"}


LEAKED = {"notes.txt", "env.txt", "zero.txt", "rel_escape.json", "pipe.txt", "dotssh", "2_Dense"}


@pytest.mark.parametrize("cmd", ["merge", "init-lora", "factorize"])
def test_side_files_never_leak_through_links(cmd, inputs, tmp_path):
    base = inputs["tiny-bert"]
    info = _leaky_base(base, tmp_path)
    before = tree_state(*inputs.values(), info["secret"].parent)
    out = tmp_path / "outs" / "out"
    argv = {
        "merge": ["merge", base, inputs["tiny-bert-lora"], "-o", out],
        "init-lora": ["init-lora", base, "-o", out, "--rank", "2", "-q"],
        "factorize": ["factorize", base, "-o", out, "--rank", "2"],
    }[cmd]
    r = no_hang(lambda: run(argv), [info["fifo"]])
    assert r.exit_code == 0, r.output
    names = {p.name for p in out.rglob("*")}
    assert not names & LEAKED, names & LEAKED
    blob = all_bytes(out)
    assert SECRET not in blob and b"PATH=" not in blob
    # negative control: the legitimate side files were copied, as regular files
    alias = next(p for p in out.rglob("vocab_alias.json"))
    assert not alias.is_symlink() and alias.read_bytes() == (base / "tokenizer.json").read_bytes()
    assert next(out.rglob("1_Pooling")).is_dir()
    assert tree_state(*inputs.values(), info["secret"].parent) == before
    assert listing(out.parent) == ["out"]


def test_copy_files_reports_what_it_skipped(inputs, tmp_path):
    base = inputs["tiny-bert"]
    info = _leaky_base(base, tmp_path)
    out = tmp_path / "out"
    with ShardedWriter(out) as w:
        w.add("x", torch.ones(2))
        copied = no_hang(lambda: w.copy_files(base), [info["fifo"]])
        explicit = w.copy_files(base, ["config.json", "notes.txt", "absent.json"])
    assert "vocab_alias.json" in copied and "1_Pooling/" in copied and "config.json" in explicit
    assert not set(copied) & LEAKED and explicit == ["config.json"]
    skipped = dict(s.split(": ", 1) for s in w.skipped)
    assert skipped["notes.txt"] == skipped["env.txt"] == skipped["dotssh"] == "a link that leaves the model directory"
    assert skipped["pipe.txt"] == "not a regular file"
    assert SECRET not in all_bytes(out)


# ----------------------------------------------------------------------------- 5. hub cache layout


def _hub_cache(src: Path, cache: Path, repo: str = "models--org--tiny", rev: str = "0123abcd") -> Path:
    """A hub-cache copy of src: blobs/<sha256> and snapshots/REV/<name> -> ../../blobs/<sha256>."""
    blobs = cache / repo / "blobs"
    snap = cache / repo / "snapshots" / rev
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (cache / repo / "refs").mkdir()
    (cache / repo / "refs" / "main").write_text(rev)
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir():
            (snap / rel).mkdir()
            continue
        data = p.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        depth = len(rel.parts) - 1
        (snap / rel).symlink_to(Path(*[".."] * (2 + depth), "blobs", sha))
    return snap


def test_hub_cache_snapshot_is_read(inputs, tmp_path):
    snap = _hub_cache(inputs["tiny-llama"], tmp_path / "hub")
    before = tree_state(tmp_path / "hub", inputs["tiny-llama"])
    assert source_root(snap) == (tmp_path / "hub" / "models--org--tiny").resolve()
    idx, ref = open_checkpoint(snap), open_checkpoint(inputs["tiny-llama"])
    assert len(idx.shards) == 3 and list(idx.tensors) == list(ref.tensors) and idx.config == ref.config
    with LazyReader(idx) as a, LazyReader(ref) as b:
        assert all(torch.equal(t, b.get(n)) for n, t in a.iter())
    r = run(["inspect", snap])
    assert r.exit_code == 0, r.output
    assert tree_state(tmp_path / "hub", inputs["tiny-llama"]) == before


def test_hub_cache_side_files_are_copied(inputs, tmp_path):
    src = inputs["tiny-bert"]
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    snap = _hub_cache(src, tmp_path / "hub")
    out = tmp_path / "o" / "merged"
    r = run(["merge", snap, inputs["tiny-bert-lora"], "-o", out])
    assert r.exit_code == 0, r.output
    for name in ("config.json", "tokenizer.json", "1_Pooling/config.json"):
        assert not (out / name).is_symlink() and (out / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("how", ["outside-cache", "not-a-cache", "dotdot-past-blobs"])
def test_hub_cache_escapes_still_refused(how, inputs, tmp_path):
    repo = "notacache" if how == "not-a-cache" else "models--org--tiny"
    snap = _hub_cache(inputs["tiny-llama"], tmp_path / "hub", repo=repo)
    shard = snap / "model-00002-of-00003.safetensors"
    if how == "outside-cache":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        shutil.copy(shard, elsewhere / shard.name)
        shard.unlink()
        shard.symlink_to(elsewhere / shard.name)
    elif how == "dotdot-past-blobs":
        target = os.readlink(shard)
        shutil.copy(shard, tmp_path / "hub" / "stolen.safetensors")
        shard.unlink()
        shard.symlink_to(Path(target).parent / ".." / ".." / "stolen.safetensors")
    before = tree_state(tmp_path / "hub")
    raises_one_line(CheckpointError, lambda: open_checkpoint(snap), "outside the checkpoint directory")
    assert tree_state(tmp_path / "hub") == before


def test_single_file_links_out_of_a_model_dir_refused(inputs, tmp_path):
    """Not only shards named by an index: model.safetensors, config.json, adapter files too."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bert, lora = inputs["tiny-bert"], inputs["tiny-bert-lora"]
    for d, name in [(bert, "model.safetensors"), (bert, "config.json"), (lora, "adapter_model.safetensors"),
                    (lora, "adapter_config.json")]:
        shutil.move(d / name, elsewhere / name)
        (d / name).symlink_to(elsewhere / name)
        raises_one_line(CheckpointError, lambda d=d: open_checkpoint(d), "outside the checkpoint directory")
        (d / name).unlink()
        shutil.move(elsewhere / name, d / name)
    open_checkpoint(bert), open_checkpoint(lora)  # control: the same files in place load


# ----------------------------------------------------------------------------- 2/3. JSON: duplicates, bombs


def _json_target(kind: str, inputs: dict[str, Path], text: bytes) -> Path:
    """Write `text` where `kind` says; return what to pass to open_checkpoint."""
    if kind == "header":
        return _header_file(inputs["tiny-bert"].parent / "m.safetensors", text)
    d = {"index": inputs["tiny-llama"], "config": inputs["tiny-bert"], "adapter_config": inputs["tiny-bert-lora"]}[kind]
    name = {"index": "model.safetensors.index.json", "config": "config.json",
            "adapter_config": "adapter_config.json"}[kind]
    (d / name).write_bytes(text)
    return d


DUPLICATES = {
    "header": (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
               b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "w"),
    "index": (b'{"metadata":{},"weight_map":{"model.norm.weight":"model-00001-of-00003.safetensors",'
              b'"model.norm.weight":"model-00003-of-00003.safetensors"}}', "model.norm.weight"),
    "config": (b'{"model_type":"bert","hidden_size":32,"hidden_size":64}', "hidden_size"),
    "adapter_config": (b'{"peft_type":"LORA","r":4,"r":8}', "r"),
}


@pytest.mark.parametrize("kind", sorted(DUPLICATES))
def test_duplicate_json_keys_refused(kind, inputs):
    text, key = DUPLICATES[kind]
    target = _json_target(kind, inputs, text)
    before = tree_state(*inputs.values())
    raises_one_line(CheckpointError, lambda: open_checkpoint(target), f"duplicate key '{re.escape(key)}'")
    assert tree_state(*inputs.values()) == before


def _bomb(kind: str, bomb: str) -> bytes:
    if bomb == "bigint":
        value = "9" * 5000
    else:
        value = "[" * 100_000 + "]" * 100_000
    if kind == "header":
        return f'{{"__metadata__":{{}},"w":{{"dtype":"F32","shape":[{value}],"data_offsets":[0,0]}}}}'.encode()
    if kind == "index":
        return f'{{"metadata":{{"total_size":{value}}},"weight_map":{{}}}}'.encode()
    return f'{{"peft_type":"LORA","r":{value}}}'.encode()


@pytest.mark.parametrize("bomb", ["bigint", "deep"])
@pytest.mark.parametrize("kind", ["header", "index", "config", "adapter_config"])
def test_json_bombs_are_one_line_errors(kind, bomb, inputs, tmp_path):
    target = _json_target(kind, inputs, _bomb(kind, bomb))
    t0 = time.perf_counter()
    msg = raises_one_line(CheckpointError, lambda: open_checkpoint(target), "not valid JSON")
    assert time.perf_counter() - t0 < 2.0
    assert ("number of 5000 characters" if bomb == "bigint" else "nested deeper") in msg, msg
    if kind != "header":
        one_line(run(["inspect", target]), "not valid JSON")


def test_json_loader_limits_and_controls(tmp_path):
    """load_json: size cap before reading, depth cap, number cap; a fine file loads (control)."""
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"a": [[[1]]], "n": int("9" * MAX_NUMBER_CHARS), "s": "[[[{{{\"\\"}))
    assert load_json(p)["n"] == int("9" * MAX_NUMBER_CHARS)
    raises_one_line(CheckpointError, lambda: load_json(p, max_depth=2), "nested deeper than 2")
    raises_one_line(CheckpointError, lambda: load_json(p, max_bytes=10), "over the 10-byte limit")
    raises_one_line(CheckpointError, lambda: load_json(b"[1, 2]"), "expected a JSON object")
    raises_one_line(CheckpointError, lambda: load_json(b'{"a": 1e' + b"9" * 200 + b"}"), "number of")
    raises_one_line(CheckpointError, lambda: load_json(b"\xff\xfe{}"), "not UTF-8")
    assert load_json(b'{"x": "]]]}}}", "y": "\\"[[["}') == {"x": "]]]}}}", "y": '"[[['}


# hypothesis: random JSON shapes, in every place the tool parses JSON

_scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
_values = st.recursive(
    _scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=25
)
_dims = st.integers(min_value=-2, max_value=2**64) | _values
_entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "BF16", "U8", "BOOL", "F99"]) | _values,
    "shape": st.lists(_dims, max_size=3) | _values,
    "data_offsets": st.lists(st.integers(min_value=-1, max_value=80), max_size=3) | _values,
})
_headers = st.dictionaries(st.text(max_size=8), _entry | _values, max_size=4) | _values
_weight_maps = st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.sampled_from(["model.norm.weight", "lm_head.weight", "x"]) | st.text(max_size=6),
    st.sampled_from(["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors", ".", "..", "/",
                     "a/b", ""]) | _values, max_size=4)}) | _values
_configs = st.dictionaries(st.sampled_from(["architectures", "tie_word_embeddings", "text_config", "model_type"])
                           | st.text(max_size=6), _values, max_size=5) | _values


def _loads_or_surgery_error(target: Path) -> None:
    try:
        idx = open_checkpoint(target)
        with LazyReader(idx) as r:
            for name, t in r.iter():
                assert tuple(t.shape) == idx.tensors[name].shape
    except SurgeryError as e:
        assert "\n" not in str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["header", "index", "config", "adapter_config"]), data=st.data())
def test_random_json_shapes_load_or_surgery_error(kind, data):
    value = data.draw({"header": _headers, "index": _weight_maps, "config": _configs, "adapter_config": _configs}[kind])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if kind == "header":
            raw = json.dumps(value).encode()
            target = _header_file(tmp / "m.safetensors", raw, b"\0" * data.draw(st.integers(0, 64)))
        else:
            name = {"index": "tiny-llama", "config": "tiny-bert", "adapter_config": "tiny-bert-lora"}[kind]
            target = tmp / name
            shutil.copytree(FIX / name, target)
            fname = {"index": "model.safetensors.index.json", "config": "config.json",
                     "adapter_config": "adapter_config.json"}[kind]
            (target / fname).write_text(json.dumps(value))
        _loads_or_surgery_error(target)


# ----------------------------------------------------------------------------- 4. FIFOs and devices


@pytest.mark.parametrize("where", ["dir/model.safetensors", "dir/pytorch_model.bin", "dir/config.json",
                                   "dir/shard", "dir/index", "file.safetensors", "file.bin"])
def test_fifo_is_refused_not_read(where, inputs, tmp_path):
    if where.startswith("dir/"):
        d = inputs["tiny-llama"] if where in ("dir/shard", "dir/index") else inputs["tiny-bert"]
        name = {"dir/shard": "model-00002-of-00003.safetensors", "dir/index": "model.safetensors.index.json"}.get(
            where, where[4:])
        if name == "pytorch_model.bin":
            (d / "model.safetensors").unlink()
        fifo, target = d / name, d
        fifo.unlink(missing_ok=True)
    else:
        fifo = target = tmp_path / where
    os.mkfifo(fifo)
    before = tree_state(*inputs.values())
    no_hang(lambda: raises_one_line(CheckpointError, lambda: open_checkpoint(target), "FIFO"), [fifo])
    r = no_hang(lambda: run(["inspect", target]), [fifo])
    one_line(r, "FIFO")
    assert tree_state(*inputs.values()) == before


def test_device_files_refused(inputs, tmp_path):
    """A link to /dev/zero (endless) given directly, or inside a directory (leaves it)."""
    (tmp_path / "z.safetensors").symlink_to("/dev/zero")
    raises_one_line(CheckpointError, lambda: open_checkpoint(tmp_path / "z.safetensors"), "character device")
    (tmp_path / "z.bin").symlink_to("/dev/zero")
    raises_one_line(CheckpointError, lambda: open_checkpoint(tmp_path / "z.bin"), "character device")
    d = inputs["tiny-bert"]
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to("/dev/zero")
    raises_one_line(CheckpointError, lambda: open_checkpoint(d), "outside the checkpoint directory")
    raises_one_line(CheckpointError, lambda: check_regular("/dev/null"), "character device")


# ----------------------------------------------------------------------------- 6. header cost, legacy .bin

_MEASURE = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    from surgery.errors import CheckpointError
    from surgery.io.safetensors_header import read_header

    def status(key):  # kB, from /proc/self/status
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    r0, g0 = status("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        out = "ok %d" % len(read_header(sys.argv[1])[0])
    except CheckpointError as e:
        out = "error: " + str(e)
    dt = time.perf_counter() - t0
    r1, g1 = status("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": dt, "rss_mib": (r1 - r0) / 1024, "getrusage_maxrss_mib": [g0 / 1024, g1 / 1024],
                      "result": out}))
""")


def _measure(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, env=env,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_header_near_the_cap_costs_linear_memory_and_time(tmp_path):
    """A valid header just under the cap (~300k tensors) parses in seconds at < 25x its size in RSS;
    a hostile one (millions of empty containers) is refused before parsing; over the cap, unread."""
    n = MAX_HEADER_BYTES - 4096
    parts, size, i = [], 2, 0
    while size < n - 80:
        s = f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}'
        parts.append(s)
        size += len(s) + 1
        i += 1
    raw = ("{" + ",".join(parts) + "}").encode()
    del parts
    valid = _header_file(tmp_path / "valid.safetensors", raw + b" " * (-len(raw) % 8), b"\0" * i)
    m = _measure(valid)
    valid.unlink()
    print(f"valid {len(raw) / 2**20:.1f} MiB header, {i} tensors: {m}")
    assert m["result"] == f"ok {i}" and m["rss_mib"] < 25 * len(raw) / 2**20 and m["seconds"] < 30
    hostile = _header_file(tmp_path / "hostile.safetensors", b'{"__metadata__":[' + b"{}," * (n // 3 - 10) + b"{}]}")
    m = _measure(hostile)
    print(f"hostile {n / 2**20:.1f} MiB header of empty objects: {m}")
    assert "objects and arrays" in m["result"] and m["rss_mib"] < 6 * n / 2**20 and m["seconds"] < 10
    over = tmp_path / "over.safetensors"
    over.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 8) + b"{}" + b" " * 64)
    raises_one_line(CheckpointError, lambda: open_checkpoint(over), "exceeds")


def test_legacy_bin_bounded_zip_mapped(tmp_path, monkeypatch):
    sd = {"w": torch.arange(600, dtype=torch.float32)}
    legacy, zipped = tmp_path / "legacy.bin", tmp_path / "zipped.bin"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    torch.save(sd, zipped)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("mmap")) or real(*a, **k))
    assert open_checkpoint(legacy).tensors["w"].shape == (600,) and calls == [False]
    assert open_checkpoint(zipped).tensors["w"].shape == (600,) and calls == [False, True]
    monkeypatch.setattr(index_mod, "LEGACY_TORCH_MAX_BYTES", 1000)
    raises_one_line(CheckpointError, lambda: open_checkpoint(legacy), r"legacy \(non-zip\).*re-save")
    assert len(calls) == 2  # refused before torch.load
    assert open_checkpoint(zipped).tensors["w"].shape == (600,)  # control: a zip file of that size maps


# ----------------------------------------------------------------------------- 7. blocked pickles


class _Custom:
    def __reduce__(self):
        return (_Custom, ())


class _System:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w')",))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("payload,needle", [
    ("system", r"refused: the pickle calls posix\.system \(blocked by weights_only\)"),
    ("exec", r"refused: the pickle calls exec \(blocked by weights_only\)"),
    ("custom", r"refused: the pickle calls .*_Custom \(blocked"),
])
def test_blocked_pickle_named_in_one_line(payload, needle, legacy, tmp_path):
    marker = tmp_path / "PWNED"
    obj = {"system": _System(marker), "exec": _Exec(marker), "custom": _Custom()}[payload]
    p = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2), "evil": obj}, p, _use_new_zipfile_serialization=not legacy)
    before = tree_state(p)
    msg = raises_one_line(CheckpointError, lambda: open_checkpoint(p), needle)
    assert "Weights only load failed" not in msg and "PyTorch 2.6" not in msg and len(msg) < 400, msg
    assert not marker.exists() and tree_state(p) == before


def test_blocked_pickle_fallback_names_the_cause():
    e = pickle.UnpicklingError("Weights only load failed. blah\n\nSomething odd happened here.\n\n"
                               "Check the documentation of torch.load to learn more")
    assert index_mod._blocked(e) == "the pickle holds something other than tensors: Something odd happened here."


# ----------------------------------------------------------------------------- 8. names escaped


def test_escape_name():
    assert escape_name("model.layers.0.weight") == "model.layers.0.weight"
    assert escape_name("é中 x") == "é中 x"
    assert escape_name("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert escape_name("\x1b[2J\x00\x7f") == "\\x1b[2J\\x00\\x7f"
    assert escape_name("rtl\u202eoverride\u200b") == "rtl\\u202eoverride\\u200b"
    assert escape_name("\U000e0001") == "\\U000e0001"
    assert escape_name(os.fsdecode(b"bad\xffbyte")) == "bad\\xffbyte"
    assert escape_name("back\\slash") == "back\\\\slash"
    assert escape_name(Path("/a/b\nc")) == "/a/b\\nc"
    assert escape_name("x" * 50, limit=10) == "x" * 10 + "…"


def test_names_in_io_messages_are_escaped(inputs, tmp_path):
    evil_dir = tmp_path / "dir\nerror: all good\x1b[2J"
    evil_dir.mkdir()
    (evil_dir / "model.safetensors").write_bytes(b"\x01\x02")
    msg = raises_one_line(CheckpointError, lambda: open_checkpoint(evil_dir), "shorter than")
    assert "dir\\nerror: all good\\x1b[2J" in msg
    raw = json.dumps({"w\x1b]0;pwn\x07\n": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}).encode()
    p = _header_file(tmp_path / "m.safetensors", raw, b"\0" * 4)
    msg = raises_one_line(CheckpointError, lambda: open_checkpoint(p), "unknown dtype")
    assert "'w\\x1b]0;pwn\\x07\\n'" in msg
    out = tmp_path / "out\nput"
    out.mkdir()
    msg = raises_one_line(OutputError, lambda: check_output_path(out, overwrite=False), "already exists")
    assert "out\\nput" in msg
    one_line(run(["inspect", evil_dir]), r"dir\\nerror")


# ----------------------------------------------------------------------------- 9. long names, links, parents, SIGTERM


def _write_one(out: Path, **kw) -> None:
    with ShardedWriter(out, **kw) as w:
        w.add("x", torch.arange(4.0))


def test_long_output_names(tmp_path):
    parent = tmp_path / "p"
    parent.mkdir()
    out = parent / ("n" * 240)
    _write_one(out)
    assert listing(parent) == [out.name] and load_file(out / "model.safetensors")["x"].tolist() == [0, 1, 2, 3]
    _write_one(out, overwrite=True)  # the "-old-" sibling of a 240-byte name fits too
    utf8 = parent / ("é" * 127)  # 254 bytes
    with atomic_output_dir(utf8) as tmp:
        (tmp / "f").write_text("x")
    assert sorted(listing(parent)) == sorted([out.name, utf8.name])
    raises_one_line(OutputError, lambda: _write_one(parent / ("n" * 256)), "over the 255-byte limit")
    deep = parent.joinpath(*["d" * 200] * 21)
    raises_one_line(OutputError, lambda: _write_one(deep), "over the 4095-byte limit")
    r = run(["merge", FIX / "tiny-bert", FIX / "tiny-bert-lora", "-o", parent / ("m" * 300)])
    one_line(r, "255-byte limit")
    assert sorted(listing(parent)) == sorted([out.name, utf8.name])


def test_overwrite_a_symlinked_output_leaves_no_link_behind(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    out.symlink_to(target, target_is_directory=True)
    _write_one(out, overwrite=True)
    assert out.is_dir() and not out.is_symlink() and listing(out) == ["model.safetensors"]
    assert (target / "keep.txt").read_text() == "mine"
    assert listing(tmp_path) == ["out", "target"]
    # a "-old-" link left by a killed run is removed by the next run (the link, not its target)
    stale = tmp_path / f".out{TMP_TAG}999999999-old-deadbeef"
    stale.symlink_to(target, target_is_directory=True)
    stale_dir = tmp_path / f".out{TMP_TAG}999999999-0123abcd"
    stale_dir.mkdir()
    _write_one(out, overwrite=True)
    assert listing(tmp_path) == ["out", "target"] and (target / "keep.txt").read_text() == "mine"
    # control: a dangling link at the output needs --overwrite like anything else
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    raises_one_line(OutputError, lambda: _write_one(tmp_path / "dangling"), "already exists")
    _write_one(tmp_path / "dangling", overwrite=True)
    assert (tmp_path / "dangling" / "model.safetensors").is_file()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_parents_created_for_the_output_are_removed_on_failure(exc, tmp_path):
    out = tmp_path / "a" / "b" / "c" / "out"
    with pytest.raises(exc):
        with ShardedWriter(out) as w:
            w.add("x", torch.ones(3))
            assert (tmp_path / "a" / "b" / "c").is_dir()
            raise exc()
    assert listing(tmp_path) == []
    (tmp_path / "a").mkdir()  # an existing parent stays; only what the run made goes
    with pytest.raises(exc):
        with atomic_output_dir(out):
            raise exc()
    assert listing(tmp_path) == ["a"] and listing(tmp_path / "a") == []
    _write_one(out)  # control: success keeps them
    assert (out / "model.safetensors").is_file()


_SIGTERM_CHILD = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    import torch
    from surgery.io import ShardedWriter

    def term(signum, frame):  # what the CLI does: SIGTERM -> KeyboardInterrupt
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, term)
    out, ready = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        with ShardedWriter(out, shard_size=1000) as w:
            for i in range(10**6):
                w.add(f"t{i}", torch.ones(100))
                if i == 20:
                    ready.write_text("writing")
                time.sleep(0.001)
    except KeyboardInterrupt:
        sys.exit(130)
""")


def test_sigterm_during_a_write_cleans_up(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out, ready = work / "x" / "y" / "out", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_CHILD, str(out), str(ready)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate(timeout=5)
        assert any(TMP_TAG in p.name for p in (work / "x" / "y").iterdir())  # mid-write: the temp is there
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert listing(work) == []  # temp dir and the parents x/y made for the output: all gone


# ----------------------------------------------------------------------------- 10. ENOSPC


@pytest.mark.parametrize("close_fails", [False, True])
@pytest.mark.parametrize("planned", [False, True])
def test_enospc_is_one_line_and_leaves_nothing(planned, close_fails, tmp_path, monkeypatch, inputs):
    disk = FullDisk(300, close_fails=close_fails)
    monkeypatch.setattr(wmod, "open", disk, raising=False)
    before = tree_state(*inputs.values())
    out = tmp_path / "new" / "out"
    tensors = {f"t{i}": torch.full((40,), float(i)) for i in range(4)}

    def write():
        with ShardedWriter(out) as w:
            if planned:
                w.plan([(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
            for n, t in tensors.items():
                w.add(n, t)

    msg = raises_one_line(OutputError, write, r"^No space left on device writing .*\(ENOSPC\)")
    assert disk.hit and "nothing was written" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no temp, no out, no "new/" parent
    # side files: ENOSPC while copying config files is the same clean error
    disk.left, disk.hit = 10**9, False
    with pytest.raises(OutputError, match="No space left on device writing"):
        with ShardedWriter(out) as w:
            w.add("x", torch.ones(2))
            disk.left = 10
            w.copy_files(inputs["tiny-bert"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert tree_state(*inputs.values()) == before
    disk.left = 10**9  # control: the same writer with room succeeds
    write()
    assert open_checkpoint(out).total_params == 160
