"""Checkpoint I/O: index, lazy reader, streaming atomic writer."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.errors import CheckpointError, OptionError, OutputError
from surgery.io import LazyReader, ShardedWriter, atomic_output_dir, open_checkpoint, parse_size
from surgery.io.writer import TMP_TAG


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(8, 16, generator=g),
        "b.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(16, generator=g).to(torch.float16),
        "d.ids": torch.arange(10, dtype=torch.int64),
        "e.scalar": torch.tensor(3.5),
        "f.mask": torch.tensor([True, False, True]),
        "g.empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("shard_size", [None, 200, 600, 10**9])
def test_writer_round_trip_exact(tmp_path, shard_size):
    src = _tensors()
    with ShardedWriter(tmp_path / "out", shard_size=shard_size) as w:
        for k, v in src.items():
            w.add(k, v)
    idx = open_checkpoint(tmp_path / "out")
    assert list(idx.tensors) == list(src)
    with LazyReader(idx) as r:
        for k, v in src.items():
            got = r.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape
            assert torch.equal(got, v), k
    # the official safetensors loader reads every shard we wrote
    for shard in idx.shards:
        load_file(shard)
    total = sum(v.numel() * v.element_size() for v in src.values())
    if shard_size is not None and shard_size < total:
        assert len(idx.shards) > 1
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == total
        assert set(index["weight_map"]) == set(src)
        assert all(f.startswith("model-0000") and f.endswith(f"-of-{len(idx.shards):05d}.safetensors")
                   for f in index["weight_map"].values())
    else:
        assert [p.name for p in idx.shards] == ["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if TMP_TAG in p.name]


def test_round_trip_negative_control(tmp_path):
    src = _tensors()
    with ShardedWriter(tmp_path / "out") as w:
        for k, v in src.items():
            w.add(k, v)
    with LazyReader(open_checkpoint(tmp_path / "out")) as r:
        got = r.get("a.weight").clone()
    got[0, 0] += 1e-6
    assert not torch.equal(got, src["a.weight"])


def test_writer_is_atomic_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ShardedWriter(out, shard_size=100) as w:
            for k, v in _tensors().items():
                w.add(k, v)
            raise RuntimeError("injected")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_enospc_is_clean_error(tmp_path, monkeypatch):
    import errno

    import surgery.io.writer as wmod

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wmod.shutil, "copyfileobj", boom)
    with pytest.raises(OutputError, match="No space left"):
        with ShardedWriter(tmp_path / "out") as w:
            w.add("x", torch.ones(3))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        with atomic_output_dir(out):
            pass
    assert (out / "keep").exists()
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["new"]


def test_stale_temp_from_dead_process_is_removed(tmp_path):
    stale = tmp_path / f".out{TMP_TAG}999999999-deadbeef"
    stale.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not stale.exists() and (tmp_path / "out" / "f").exists()


def test_output_inside_input_refused(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    with pytest.raises(OutputError, match="inside the input"):
        with atomic_output_dir(src / "sub", inputs=[src]):
            pass
    with pytest.raises(OutputError, match="is the input"):
        with atomic_output_dir(src, overwrite=True, inputs=[src]):
            pass


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                           ("1000", 1000), ("1.5kb", 1500), (42, 42)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "5XB", "GB", "-1GB", "0", "1e3GB"])
def test_parse_size_rejects(text):
    with pytest.raises(OptionError):
        parse_size(text)


def test_bin_checkpoint_and_sharded_bin(tmp_path):
    src = _tensors()
    torch.save(src, tmp_path / "pytorch_model.bin")
    idx = open_checkpoint(tmp_path)
    assert idx.format == "torch" and set(idx.tensors) == set(src)
    with LazyReader(idx) as r:
        assert all(torch.equal(r.get(k), v) for k, v in src.items())
    # sharded .bin with an index
    d = tmp_path / "sharded"
    d.mkdir()
    names = list(src)
    torch.save({k: src[k] for k in names[:3]}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({k: src[k] for k in names[3:]}, d / "pytorch_model-00002-of-00002.bin")
    wm = {k: f"pytorch_model-0000{1 if i < 3 else 2}-of-00002.bin" for i, k in enumerate(names)}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    idx = open_checkpoint(d)
    assert len(idx.shards) == 2
    with LazyReader(idx) as r:
        assert all(torch.equal(t, src[k]) for k, t in r.iter())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused_and_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.ones(2), "evil": _Evil(str(marker))}, tmp_path / "model.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        open_checkpoint(tmp_path / "model.pt")
    assert not marker.exists()


def test_single_file_and_unknown_format(tmp_path):
    save_file({"w": torch.ones(2, 2)}, tmp_path / "m.safetensors")
    assert list(open_checkpoint(tmp_path / "m.safetensors").tensors) == ["w"]
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "m.txt")
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        open_checkpoint(tmp_path / "empty")


def _sharded_dir(tmp_path):
    d = tmp_path / "sharded"
    with ShardedWriter(d, shard_size=200) as w:
        for k, v in _tensors().items():
            w.add(k, v)
    return d


def test_index_missing_shard(tmp_path):
    d = _sharded_dir(tmp_path)
    next(d.glob("model-00002-*")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(d)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd"])
def test_index_path_escape_refused(tmp_path, bad):
    d = _sharded_dir(tmp_path)
    p = d / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad
    p.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        open_checkpoint(d)


def test_index_symlink_escape_refused(tmp_path):
    d = _sharded_dir(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"a.weight": torch.ones(8, 16)}, outside)
    p = d / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    os.symlink(outside, d / "link.safetensors")
    index["weight_map"]["a.weight"] = "link.safetensors"
    p.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        open_checkpoint(d)


def test_malformed_index(tmp_path):
    d = _sharded_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        open_checkpoint(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="weight_map"):
        open_checkpoint(d)


def _corrupt(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header,data,match", [
    (b"{bad", b"", "not valid JSON"),
    ({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "past the data end"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "v": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8, "overlap"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
])
def test_corrupt_headers(tmp_path, header, data, match):
    p = _corrupt(tmp_path / "m.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(p)


def test_huge_header_length_and_truncation(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds"):
        open_checkpoint(p)
    p.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="shorter"):
        open_checkpoint(p)
    save_file({"w": torch.ones(64)}, p)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(CheckpointError):
        open_checkpoint(p)


def test_tied_embeddings_reported(tmp_path):
    cfg = {"architectures": ["GPT2LMHeadModel"], "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"transformer.wte.weight": torch.ones(10, 4)}, tmp_path / "model.safetensors")
    assert open_checkpoint(tmp_path).tied == {"lm_head.weight": "transformer.wte.weight"}
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert open_checkpoint(tmp_path).tied == {}


def test_inputs_never_modified_by_reading(tmp_path):
    import hashlib

    d = _sharded_dir(tmp_path)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
    with LazyReader(open_checkpoint(d)) as r:
        for _, t in r.iter():
            t.add_(1) if t.is_floating_point() else None
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir()}
    assert before == after


def test_index_reads_no_tensor_data(tmp_path, monkeypatch):
    """inspect/index time must not depend on data size: it never reads past the header."""
    save_file({"w": torch.zeros(1000, 1000)}, tmp_path / "model.safetensors")
    reads = []
    real_open = open

    def spy(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "b" in mode:
            orig = f.read

            def read(n=-1):
                reads.append(n)
                return orig(n)
            f.read = read
        return f

    monkeypatch.setattr("builtins.open", spy)
    open_checkpoint(tmp_path)
    assert reads and all(0 <= n < 10_000 for n in reads)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_get_rows_reads_exact_row_ranges(tmp_path, fmt):
    src = {"w": torch.randn(13, 5).to(torch.bfloat16), "v": torch.arange(7.0)}
    if fmt == "bin":
        torch.save(src, tmp_path / "pytorch_model.bin")
    else:
        save_file(src, tmp_path / "model.safetensors")
    with LazyReader(open_checkpoint(tmp_path)) as r:
        assert torch.equal(r.get_rows("w", 3, 9), src["w"][3:9])
        assert torch.equal(r.get_rows("w", 10, 99), src["w"][10:])  # clamped at the end
        assert torch.equal(r.get_rows("v", 0, 2), src["v"][:2])
        assert r.get_rows("w", 5, 5).shape == (0, 5)
        assert not torch.equal(r.get_rows("w", 4, 10), src["w"][3:9])  # negative control


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite(dtype):
    from surgery.core.tensors import all_finite, count_non_finite

    big = torch.full((5_000_000,), torch.finfo(dtype).max / 2, dtype=dtype)  # the sum overflows, values are finite
    assert all_finite(big) and count_non_finite(big) == 0
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.zeros(5_000_000, dtype=dtype)
        x[4_321_000] = bad
        assert not all_finite(x) and count_non_finite(x) == 1
    assert all_finite(torch.arange(10))  # integers are always finite
