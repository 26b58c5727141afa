"""Faults lose nothing: inputs are never modified, a killed run never leaves a
complete-looking output, a full disk ends in a clear error with nothing left
behind, and unusable output locations are refused before any work.

The SIGKILL test runs the real CLI as a subprocess (`python -m surgery ...`) and kills
it after a random delay drawn from the command's own duration, measured first.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import pkgutil
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import surgery
from surgery.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
TMP_NAME = re.compile(r"^\.(?P<out>.+)\.surgery-tmp-\d+-(old-)?[0-9a-f]{8}$")


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def tree_hashes(*roots: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under the roots (the inputs), keyed by path."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def temps_beside(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.surgery-tmp-*"))


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- inputs never modified


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Private copies of the fixtures (so a bug that writes into an input cannot spoil the repo)."""
    d = tmp_path / "in"
    d.mkdir()
    out = {}
    for name in ("tiny-bert", "tiny-bert-ft", "tiny-bert-lora", "tiny-llama", "tiny-llama-lora"):
        shutil.copytree(FIX / name, d / name)
        out[name] = d / name
    return out


def _commands(i: dict[str, Path], o: Path) -> dict[str, list]:
    cmds = {
        "inspect": ["inspect", i["tiny-llama"], "--json"],
        "extract-lora": ["extract-lora", i["tiny-bert"], i["tiny-bert-ft"], "-o", o / "lora", "--rank", "2", "-q",
                         "--svd", "randomized"],
        "merge": ["merge", i["tiny-llama"], i["tiny-llama-lora"], "-o", o / "merged", "--weight", "0.5"],
        "unmerge": ["merge", i["tiny-bert"], i["tiny-bert-lora"], "-o", o / "unmerged", "--unmerge"],
        "analyze": ["analyze", i["tiny-bert-ft"], "--base", i["tiny-bert"], "-q"],
        "init-lora": ["init-lora", i["tiny-bert"], "-o", o / "init", "--rank", "2", "-q"],
        "init-adapter": ["init-adapter", i["tiny-bert"], "-o", o / "bottleneck", "--bottleneck", "2", "-q"],
        "factorize": ["factorize", i["tiny-bert"], "-o", o / "fact", "--rank", "2", "-q", "--no-check"],
    }
    return {k: v for k, v in cmds.items() if v[0] in cli.commands}


def test_inputs_never_modified_by_any_command(inputs, tmp_path):
    """Every input file keeps its bytes and mtime through every command (export-onnx: see the kill test)."""
    before = tree_hashes(*inputs.values())
    ran = []
    for name, args in _commands(inputs, tmp_path / "out").items():
        r = run(args)
        assert r.exit_code == 0, f"{name}: {r.output}"
        ran.append(name)
        assert tree_hashes(*inputs.values()) == before, f"{name} modified an input"
    assert {"inspect", "extract-lora", "merge", "unmerge"} <= set(ran)
    # nothing was added inside the input directories either
    assert set(tree_hashes(*inputs.values())) == set(before)


def test_input_hash_negative_control(inputs):
    before = tree_hashes(inputs["tiny-bert"])
    p = inputs["tiny-bert"] / "config.json"
    p.write_text(p.read_text())  # same bytes, new mtime
    os.utime(p, ns=(0, 0))
    assert tree_hashes(inputs["tiny-bert"]) != before


# ----------------------------------------------------------------------------- SIGKILL at random moments


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    return env


def _spawn(args: list, log: Path) -> subprocess.Popen:
    """The CLI in its own session; stderr to a file (a pipe nobody reads could fill up and block it)."""
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "surgery", *map(str, args)], cwd=ROOT, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the CLI and anything it started
    except ProcessLookupError:
        pass
    proc.wait()


def _valid_extract(out: Path, ref: dict[str, bytes]) -> None:
    assert dir_bytes(out) == ref  # deterministic: a complete output is byte-identical to the reference


def _valid_export(out: Path, ref: dict[str, bytes]) -> None:
    import onnx

    assert set(dir_bytes(out)) == set(ref)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "not validated"
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))


KILL_PLANS = {
    # command: (trials, argv builder (inputs, out), validity check)
    "extract-lora": (6, lambda i, o: ["extract-lora", i["tiny-bert"], i["tiny-bert-ft"], "-o", o, "--rank", "2",
                                      "-q", "--svd", "randomized"], _valid_extract),
    "merge": (12, lambda i, o: ["merge", i["tiny-llama"], i["tiny-llama-lora"], "-o", o, "--shard-size", "20KB"],
              _valid_extract),
    "export-onnx": (2, lambda i, o: ["export-onnx", i["tiny-bert"], "-o", o, "--no-validate"], _valid_export),
}
assert sum(n for n, _, _ in KILL_PLANS.values()) >= 20


@pytest.mark.parametrize("cmd", sorted(KILL_PLANS))
def test_sigkill_at_random_moments(cmd, inputs, tmp_path):
    trials, build, valid = KILL_PLANS[cmd]
    runs = tmp_path / "runs"
    runs.mkdir()
    out = runs / "out"
    hashes = tree_hashes(*inputs.values())
    rng = random.Random(f"sigkill-{cmd}")

    # 1. the command's typical duration, when it starts writing, and the reference output
    log = tmp_path / "stderr.txt"
    t0 = time.monotonic()
    proc = _spawn(build(inputs, out), log)
    writing = renamed = None
    while proc.poll() is None:
        if writing is None and any(runs.iterdir()):
            writing = time.monotonic() - t0
        if renamed is None and out.exists():
            renamed = time.monotonic() - t0
        time.sleep(0.002)
        assert time.monotonic() - t0 < 300, "the reference run hangs"
    duration = time.monotonic() - t0
    assert proc.returncode == 0, log.read_text()
    writing = duration if writing is None else writing
    window = max((renamed or duration) - writing, 0.01)  # temp dir exists, output not yet renamed
    ref = dir_bytes(out)
    shutil.rmtree(out)

    # 2. kills at random moments: every other one anywhere in the run, the others in the
    #    window where the output is being written and renamed (most of a tiny run is imports)
    outcomes: dict[str, int] = {}
    for trial in range(trials):
        stale = set(runs.iterdir())  # temp dirs of earlier killed trials (this run removes them)
        proc = _spawn(build(inputs, out), log)
        if trial % 2 == 0:
            delay = rng.uniform(0.1, 1.0) * duration
        else:  # anchored to the moment its own temporary directory appears
            t0 = time.monotonic()
            while proc.poll() is None and not set(runs.iterdir()) - stale and time.monotonic() - t0 < 3 * duration:
                time.sleep(0.005)
            delay = rng.uniform(0.0, 1.5 * window)
        try:
            assert proc.wait(timeout=delay) == 0, log.read_text()
            outcome = "finished"
        except subprocess.TimeoutExpired:
            _kill(proc)
            outcome = "killed"
        leftovers = [p for p in runs.iterdir() if p != out]
        for p in leftovers:  # only clearly named temporary directories, never a stray file
            m = TMP_NAME.match(p.name)
            assert m and m.group("out") == "out" and p.is_dir(), f"trial {trial}: unexpected {p.name}"
        if out.exists():  # the rename happened: the output must be complete and valid
            valid(out, ref)
            shutil.rmtree(out)
            outcome += ", output complete"
        else:
            outcome += ", temp dir left" if leftovers else ", nothing left"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    # 3. a re-run succeeds and removes every temporary directory the killed runs left
    proc = _spawn(build(inputs, out), log)
    assert proc.wait(timeout=300) == 0, log.read_text()
    valid(out, ref)
    assert [p.name for p in runs.iterdir()] == ["out"], sorted(p.name for p in runs.iterdir())
    assert tree_hashes(*inputs.values()) == hashes, "a killed run modified an input"
    print(f"{cmd}: {trials} kills over a {duration:.1f} s run "
          f"(writing {writing:.2f}-{writing + window:.2f} s): {outcomes}")


# ----------------------------------------------------------------------------- a full disk


class _DiskFull:
    """`open` for surgery.io.writer whose write files accept `budget` bytes in all, then raise ENOSPC
    (after writing the part that fit, as a real full disk does)."""

    def __init__(self, budget: int):
        self.left = budget
        self.hit = False

    def __call__(self, file, mode="r", *a, **k):
        f = open(file, mode, *a, **k)
        if not any(c in mode for c in "wax+"):
            return f
        disk = self
        real_write = f.write

        class _F:
            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, b):
                n = len(b) if not isinstance(b, memoryview) else b.nbytes
                if n <= disk.left:
                    disk.left -= n
                    return real_write(b)
                part = memoryview(b).cast("B")[: disk.left]
                real_write(part)
                disk.left = 0
                disk.hit = True
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return _F()


def _disk_cases():
    for cmd in ("extract-lora", "merge"):
        for frac in (0.0, 0.1, 0.45, 0.8, 0.99):
            yield cmd, frac


def _disk_argv(cmd: str, i: dict[str, Path], out: Path) -> list:
    if cmd == "extract-lora":
        return ["extract-lora", i["tiny-bert"], i["tiny-bert-ft"], "-o", out, "--rank", "2", "-q"]
    return ["merge", i["tiny-llama"], i["tiny-llama-lora"], "-o", out, "--shard-size", "20KB"]


@pytest.fixture
def reference_sizes(inputs, tmp_path) -> dict[str, int]:
    """Bytes the writer writes for each command (spill files + shards), measured by an unlimited run."""
    import surgery.io.writer as wmod

    sizes = {}
    for cmd in ("extract-lora", "merge"):
        disk = _DiskFull(10**12)
        mp = pytest.MonkeyPatch()
        mp.setattr(wmod, "open", disk, raising=False)
        try:
            r = run(_disk_argv(cmd, inputs, tmp_path / f"ref-{cmd}"))
        finally:
            mp.undo()
        assert r.exit_code == 0, r.output
        sizes[cmd] = 10**12 - disk.left
    return sizes


@pytest.mark.parametrize("cmd,frac", list(_disk_cases()))
def test_disk_full_mid_write(cmd, frac, inputs, reference_sizes, tmp_path, monkeypatch):
    import surgery.io.writer as wmod

    disk = _DiskFull(int(frac * reference_sizes[cmd]))
    monkeypatch.setattr(wmod, "open", disk, raising=False)
    hashes = tree_hashes(*inputs.values())
    out = tmp_path / "out"
    r = run(_disk_argv(cmd, inputs, out))
    assert disk.hit
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], r.stderr
    assert "No space left on device" in lines[0] and "ENOSPC" in lines[0], lines[0]
    assert not out.exists() and not temps_beside(out)  # no partial output, temp dir cleaned up
    assert tree_hashes(*inputs.values()) == hashes


def test_disk_full_negative_control(inputs, reference_sizes, tmp_path, monkeypatch):
    """With exactly the bytes needed, the same injected writer succeeds (the budget is what fails above)."""
    import surgery.io.writer as wmod

    disk = _DiskFull(reference_sizes["merge"])
    monkeypatch.setattr(wmod, "open", disk, raising=False)
    assert run(_disk_argv("merge", inputs, tmp_path / "out")).exit_code == 0
    assert not disk.hit and disk.left == 0


@pytest.mark.parametrize("where", ["config-json", "final-rename"])
@pytest.mark.parametrize("cmd", ["extract-lora", "merge"])
def test_failure_at_the_last_steps(cmd, where, inputs, tmp_path, monkeypatch):
    """ENOSPC writing adapter_config.json / config.json, or EIO at the final rename: clean error, nothing left."""
    import surgery.io.writer as wmod

    if where == "config-json":
        def fail(self, name, obj):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)

        monkeypatch.setattr(wmod.ShardedWriter, "write_json", fail)
        monkeypatch.setattr(wmod.ShardedWriter, "copy_files", lambda self, *a, **k: fail(self, "config.json", None))
    else:
        real = os.rename

        def rename(src, dst):
            if TMP_NAME.match(Path(src).name):
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
            return real(src, dst)

        monkeypatch.setattr(wmod.os, "rename", rename)
    out = tmp_path / "out"
    r = run(_disk_argv(cmd, inputs, out))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0], r.stderr
    assert ("ENOSPC" if where == "config-json" else "EIO") in lines[0]
    assert not out.exists() and not temps_beside(out)


def test_overwrite_keeps_the_old_output_when_the_new_one_fails(inputs, tmp_path, monkeypatch):
    """--overwrite replaces the old output only once the new one is complete."""
    import surgery.io.writer as wmod

    out = tmp_path / "out"
    assert run(_disk_argv("merge", inputs, out)).exit_code == 0
    old = dir_bytes(out)
    monkeypatch.setattr(wmod, "open", _DiskFull(1000), raising=False)
    r = run(_disk_argv("merge", inputs, out) + ["--overwrite"])
    assert r.exit_code == 1
    assert dir_bytes(out) == old and not temps_beside(out)


# ----------------------------------------------------------------------------- unusable output locations


def _can_drop_privileges() -> bool:
    return hasattr(os, "seteuid") and os.geteuid() == 0


class _AsNobody:
    """Root ignores permission bits: run the block with effective uid/gid nobody (65534).
    Not root: nothing to do, permission bits apply as they are."""

    def __enter__(self):
        if _can_drop_privileges():
            os.setegid(65534)
            os.seteuid(65534)
        return self

    def __exit__(self, *exc):
        if hasattr(os, "seteuid") and os.getuid() == 0:
            os.seteuid(0)
            os.setegid(0)


def _world_readable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # transformers writes some fixture files 0600
    return dst


@pytest.fixture
def readonly_dir():
    """A directory nobody may write into, in a tree everybody may traverse (tmp_path is root-only),
    beside world-readable copies of the inputs (in `<dir>/../in`)."""
    base = Path(tempfile.mkdtemp(prefix="surgery-ro-"))
    base.chmod(0o755)
    for name in ("tiny-bert", "tiny-bert-ft", "tiny-bert-lora"):
        _world_readable_copy(FIX / name, base / "in" / name)
    # Modules imported lazily must be loaded while still root: the interpreter's stdlib may
    # live where nobody cannot read (here /root/.pyenv).
    import encodings.raw_unicode_escape  # noqa: F401

    import onnx  # noqa: F401

    # Commands load lazily (the table in surgery.cli.commands) and import the library inside
    # the command: import every surgery module now, while still root.
    for m in pkgutil.walk_packages(surgery.__path__, "surgery."):
        importlib.import_module(m.name)
    ro = base / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with _AsNobody():
            probe_ok = os.access(ro, os.W_OK, effective_ids=os.access in os.supports_effective_ids)
            try:
                (ro / "probe").mkdir()
                writable = True
                (ro / "probe").rmdir()
            except PermissionError:
                writable = False
        if writable or probe_ok:
            pytest.skip("cannot make a read-only directory here (root without seteuid?)")
        yield ro
    finally:
        ro.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("cmd", [c for c in ("extract-lora", "merge", "init-lora", "factorize", "export-onnx")
                                 if c in cli.commands])
def test_read_only_output_location(cmd, readonly_dir):
    out = readonly_dir / "out"
    i = readonly_dir.parent / "in"
    args = {
        "extract-lora": ["extract-lora", i / "tiny-bert", i / "tiny-bert-ft", "-o", out, "--rank", "2", "-q"],
        "merge": ["merge", i / "tiny-bert", i / "tiny-bert-lora", "-o", out],
        "init-lora": ["init-lora", i / "tiny-bert", "-o", out, "--rank", "2", "-q"],
        "factorize": ["factorize", i / "tiny-bert", "-o", out, "--rank", "2", "-q", "--no-check"],
        "export-onnx": ["export-onnx", i / "tiny-bert", "-o", out, "--no-validate"],
    }[cmd]
    t0 = time.monotonic()
    with _AsNobody():
        r = run(args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "permission denied" in lines[0].lower(), r.stderr
    assert time.monotonic() - t0 < 5, "refused only after the work (checked before the first SVD/export)"
    assert list(readonly_dir.iterdir()) == []


def test_read_only_negative_control(readonly_dir):
    """The same command into a writable sibling succeeds under the same identity."""
    ok = readonly_dir.parent / "writable"
    ok.mkdir()
    ok.chmod(0o777)
    with _AsNobody():
        i = readonly_dir.parent / "in"
        r = run(["merge", i / "tiny-bert", i / "tiny-bert-lora", "-o", ok / "out"])
    assert r.exit_code == 0, r.output


def test_output_symlinked_to_an_input_is_refused(inputs, tmp_path):
    """An output path that is a symlink to the input is the input."""
    link = tmp_path / "link"
    link.symlink_to(inputs["tiny-bert"], target_is_directory=True)
    before = tree_hashes(inputs["tiny-bert"])
    r = run(["merge", inputs["tiny-bert"], inputs["tiny-bert-lora"], "-o", link, "--overwrite"])
    assert r.exit_code == 1 and "is the input" in r.stderr, r.output
    r = run(["merge", inputs["tiny-bert"], inputs["tiny-bert-lora"], "-o", tmp_path, "--overwrite"])
    assert r.exit_code == 1 and "contains the input" in r.stderr, r.output
    assert tree_hashes(inputs["tiny-bert"]) == before


def test_stale_temp_of_a_live_process_is_kept(tmp_path, inputs):
    """clean_stale_temps removes only temps whose process is gone: a concurrent run's temp survives."""
    out = tmp_path / "out"
    live = tmp_path / f".out.surgery-tmp-{os.getpid()}-0123abcd"
    dead = tmp_path / ".out.surgery-tmp-999999999-0123abcd"
    live.mkdir()
    dead.mkdir()
    assert run(_disk_argv("merge", inputs, out)).exit_code == 0
    assert live.exists() and not dead.exists()




def test_report_file_never_overwrites_an_input(inputs, tmp_path):
    target = inputs["tiny-bert"] / "config.json"
    before = tree_hashes(inputs["tiny-bert"])
    r = run(["extract-lora", inputs["tiny-bert"], inputs["tiny-bert-ft"], "-o", tmp_path / "lora", "--rank", "2",
             "-q", "--report", target])
    assert tree_hashes(inputs["tiny-bert"]) == before, "--report overwrote an input"
    assert r.exit_code == 1 and "input" in r.stderr


def test_report_into_missing_directory_is_refused_before_work(inputs, tmp_path):
    r = run(["extract-lora", inputs["tiny-bert"], inputs["tiny-bert-ft"], "-o", tmp_path / "lora", "--rank", "2",
             "-q", "--report", tmp_path / "no-such-dir" / "report.json"])
    assert r.exit_code in (1, 2) and "internal error" not in r.output
    assert not (tmp_path / "lora").exists()
