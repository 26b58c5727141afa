"""Fuzzing the safetensors header parser and the lazy reader.

A seeded mutator derives hostile files from small valid ones: byte flips in the
header, JSON-level mutations of dtypes / shapes / offsets / names / metadata,
truncations at random points and rewrites of the 8-byte header-length field.
For every case, `open_checkpoint` followed by reading every tensor with
`LazyReader` must either succeed with tensors consistent with the header (shape,
dtype, bytes at the declared offsets) or raise a SurgeryError, never another
exception, and each case must finish in well under a second.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgery.errors import CheckpointError, SurgeryError
from surgery.io import LazyReader, open_checkpoint
from surgery.io.safetensors_header import DTYPES

N_CASES = 1200  # >= 1000 mutated headers and truncations
SEED = 20240607
PER_CASE_LIMIT_S = 1.0

ODD_VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**32 + 1, 2**62, 2**63, 2**64, 2**64 + 1, -(2**63), 10**30,
    1.5, -0.0, 1e308, "", "F32", "x" * 300, [], [1], [0, 0], {}, {"a": 1}, "\u0000", "\u00e9",
]
DIM_VALUES = [0, 1, 2, 3, 7, -1, -2**63, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 10**40, 1.0, "4", None, True]


def _fixtures(tmp: Path) -> list[bytes]:
    """Small valid files: mixed dtypes incl. 0-d and empty tensors, and a real fixture shard."""
    g = torch.Generator().manual_seed(0)
    mixed = {
        "a.weight": torch.randn(4, 6, generator=g),
        "b.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(5, generator=g).to(torch.float16),
        "d.ids": torch.arange(7, dtype=torch.int64),
        "e.scalar": torch.tensor(2.5, dtype=torch.float64),
        "f.mask": torch.tensor([True, False, True]),
        "g.empty": torch.zeros(0, 3),
        "h.u8": torch.arange(5, dtype=torch.uint8),
    }
    p1 = tmp / "mixed.safetensors"
    save_file(mixed, p1, metadata={"format": "pt"})
    p2 = tmp / "one.safetensors"
    save_file({"w": torch.ones(2, 2)}, p2)
    files = [p1.read_bytes(), p2.read_bytes()]
    real = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-llama-lora" / "adapter_model.safetensors"
    if real.is_file():
        files.append(real.read_bytes())
    return files


def _split(blob: bytes) -> tuple[int, bytes, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return n, blob[8:8 + n], blob[8 + n:]


def _pack(header_raw: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header_raw)) + header_raw + data


# ----------------------------------------------------------------------------- mutators


def _mut_byte_flips(rng: random.Random, blob: bytes) -> bytes:
    n, raw, data = _split(blob)
    raw = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(raw))
        raw[i] = rng.choice([rng.randrange(256), raw[i] ^ (1 << rng.randrange(8)),
                             ord(rng.choice('{}[]",:0123456789-e.'))])
    return struct.pack("<Q", n) + bytes(raw) + data


def _mut_json(rng: random.Random, blob: bytes) -> bytes:
    _, raw, data = _split(blob)
    header = json.loads(raw)
    names = [k for k in header if k != "__metadata__"]
    for _ in range(rng.randint(1, 3)):
        what = rng.choice(["dtype", "shape", "offsets", "name", "entry", "meta", "extra", "dup", "swap"])
        name = rng.choice(names) if names else None
        entry = header.get(name) if name is not None else None
        if what == "dtype" and isinstance(entry, dict):
            entry["dtype"] = rng.choice([*DTYPES, "F99", "f32", "Q4", "", None, 4, ["F32"], "F8_E8M0", "C64"])
        elif what == "shape" and isinstance(entry, dict) and isinstance(entry.get("shape"), list):
            shape = entry["shape"]
            op = rng.randrange(6)
            if op == 0 and shape:
                shape[rng.randrange(len(shape))] = rng.choice(DIM_VALUES)
            elif op == 1:
                shape.insert(rng.randint(0, len(shape)), rng.choice(DIM_VALUES))
            elif op == 2 and shape:
                shape.pop(rng.randrange(len(shape)))
            elif op == 3:
                entry["shape"] = rng.choice(ODD_VALUES)
            elif op == 4 and shape:
                shape.reverse()
            else:  # keep numel, change rank: consistent and must read fine
                entry["shape"] = [math.prod(shape)] if all(type(d) is int for d in shape) else shape
        elif what == "offsets" and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            offs = entry["data_offsets"]
            op = rng.randrange(6)
            if op == 0 and len(offs) == 2:
                offs[rng.randrange(2)] = rng.choice(DIM_VALUES)
            elif op == 1 and len(offs) == 2:
                d = rng.choice([-8, -4, -2, -1, 1, 2, 4, 8])
                offs[0] += d
                offs[1] += d
            elif op == 2 and len(offs) == 2:
                offs.reverse()
            elif op == 3:
                offs.append(rng.choice(DIM_VALUES))
            elif op == 4:
                entry["data_offsets"] = rng.choice(ODD_VALUES)
            elif len(offs) == 2 and isinstance(offs[1], int):
                offs[1] = offs[1] + rng.choice([-1, 1, len(data), 2**40])
        elif what == "name" and name is not None:
            new = rng.choice(["", " ", "a.weight", "__metadata__", "x" * 5000, "\u00e9\u4e2d", "../etc", "b.weight"])
            header[new] = header.pop(name)
            names = [k for k in header if k != "__metadata__"]
        elif what == "entry" and name is not None:
            header[name] = rng.choice(ODD_VALUES)
        elif what == "meta":
            header["__metadata__"] = rng.choice([None, {}, {"format": "pt"}, {"k": 1}, [], "x", {"a": None}, 3])
        elif what == "extra":
            header[f"extra{rng.randrange(100)}"] = {
                "dtype": rng.choice(list(DTYPES)), "shape": [rng.choice([0, 1, 2])],
                "data_offsets": [rng.choice([0, len(data), len(data) + 4]), rng.choice([0, len(data), len(data) + 4])],
            }
        elif what == "dup" and len(names) >= 2:  # two entries claim the same bytes
            a, b = rng.sample(names, 2)
            if isinstance(header[a], dict) and isinstance(header[b], dict):
                header[b] = copy.deepcopy(header[a])
        elif what == "swap" and len(names) >= 2:  # out-of-order ranges in the JSON (legal if contiguous)
            a, b = rng.sample(names, 2)
            header[a], header[b] = header[b], header[a]
    raw = json.dumps(header, ensure_ascii=rng.random() < 0.5).encode()
    if rng.random() < 0.5:
        raw += b" " * (-len(raw) % 8)
    return _pack(raw, data)


def _mut_truncate(rng: random.Random, blob: bytes) -> bytes:
    n, _, _ = _split(blob)
    cut = rng.choice([rng.randrange(0, len(blob)), rng.randrange(0, min(len(blob), 8 + n + 1)),
                      len(blob) - rng.randint(1, 8)])
    return blob[:max(cut, 0)]


def _mut_length(rng: random.Random, blob: bytes) -> bytes:
    n, _, _ = _split(blob)
    new = rng.choice([0, 1, 2, n - 1, n + 1, n - 8, n + 8, len(blob) - 8, len(blob) - 7, 2**20, 100 * 2**20,
                      100 * 2**20 + 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, rng.randrange(2**64)])
    return struct.pack("<Q", max(new, 0) % 2**64) + blob[8:]


def _mut_append(rng: random.Random, blob: bytes) -> bytes:
    return blob + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))


MUTATORS = [(_mut_byte_flips, 3), (_mut_json, 5), (_mut_truncate, 2), (_mut_length, 1), (_mut_append, 1)]


def _mutate(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    fn = rng.choices([m for m, _ in MUTATORS], weights=[w for _, w in MUTATORS])[0]
    out = fn(rng, blob)
    if rng.random() < 0.1:  # stack a second mutation now and then
        fn2 = rng.choice([m for m, _ in MUTATORS if m is not _mut_length])
        try:
            out = fn2(rng, out)
        except (struct.error, ValueError, UnicodeDecodeError, IndexError, KeyError, TypeError, AttributeError):
            pass  # the first mutation made the file unparseable for a JSON-level mutator: keep it
    return fn.__name__.removeprefix("_mut_"), out


# ----------------------------------------------------------------------------- the check


def _check_consistent(path: Path) -> int:
    """open + read everything; returns the number of tensors. Raises SurgeryError on bad files."""
    idx = open_checkpoint(path)
    blob = path.read_bytes()
    with LazyReader(idx) as r:
        for name, t in r.iter():
            info = idx.tensors[name]
            assert tuple(t.shape) == info.shape and t.dtype == info.dtype, name
            assert t.numel() * t.element_size() == info.nbytes, name
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            assert raw == blob[info.offset:info.offset + info.nbytes], name
    return len(idx.tensors)


def test_fuzz_headers_only_surgery_errors(tmp_path):
    rng = random.Random(SEED)
    seeds = _fixtures(tmp_path)
    target = tmp_path / "fuzz.safetensors"
    outcomes = {"ok": 0, "error": 0}
    by_kind: dict[str, int] = {}
    slowest = 0.0
    for case in range(N_CASES):
        kind, blob = _mutate(rng, rng.choice(seeds))
        by_kind[kind] = by_kind.get(kind, 0) + 1
        target.write_bytes(blob)
        t0 = time.perf_counter()
        try:
            _check_consistent(target)
            outcomes["ok"] += 1
        except SurgeryError as e:
            msg = str(e)
            assert msg and "\n" not in msg, f"case {case} ({kind}): message not one line: {msg!r}"
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            (tmp_path / f"case{case}.safetensors").write_bytes(blob)
            pytest.fail(f"case {case} ({kind}): {type(e).__name__}: {e} (file kept as case{case}.safetensors)")
        dt = time.perf_counter() - t0
        slowest = max(slowest, dt)
        assert dt < PER_CASE_LIMIT_S, f"case {case} ({kind}) took {dt:.2f} s"
    assert sum(outcomes.values()) == N_CASES >= 1000
    # the mutator really produces hostile files (and some benign ones)
    assert outcomes["error"] > N_CASES // 2, outcomes
    assert all(by_kind.get(k, 0) >= 50 for k in ("byte_flips", "json", "truncate", "length", "append")), by_kind
    print(f"fuzz: {N_CASES} cases {by_kind}, outcomes {outcomes}, slowest {slowest * 1000:.1f} ms")


def test_fuzz_negative_control(tmp_path):
    """The checker is not vacuous: the unmutated seeds read fine and a forged file is caught."""
    seeds = _fixtures(tmp_path)
    p = tmp_path / "seed.safetensors"
    for blob in seeds:
        p.write_bytes(blob)
        assert _check_consistent(p) >= 1
    # a header that lies about a range the parser would accept is caught by the consistency check
    blob = seeds[1]
    n, raw, data = _split(blob)
    p.write_bytes(_pack(raw, data[:-1] + bytes([data[-1] ^ 0xFF])))  # corrupt data, valid header
    assert _check_consistent(p) == 1  # still readable: data corruption is not the parser's to detect
    with pytest.raises(CheckpointError):
        p.write_bytes(blob[:-1])
        _check_consistent(p)


@pytest.mark.parametrize("declared", [2**63, 2**64 - 1, 100 * 2**20, 2**40])
def test_huge_declared_header_length_bounded_memory(tmp_path, declared):
    """A header length of up to 2^64 is refused without allocating it (no OOM, no hang)."""
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", declared) + b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}' + b"\0" * 4)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match="header length"):
            open_checkpoint(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < PER_CASE_LIMIT_S
    assert peak < 4 * 2**20, f"peak {peak} bytes"


def test_huge_shapes_with_zero_elements_and_dim_overflow(tmp_path):
    """Dims are bounded: a shape whose product overflows int64 (or one dim >= 2^63) is a CheckpointError,
    while a legal empty tensor with a large dim reads fine."""
    p = tmp_path / "m.safetensors"
    for shape in ([0, 2**64], [0, 2**63], [2**40, 2**40, 0, 2**40], [2**63]):
        raw = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
        p.write_bytes(_pack(raw, b""))
        with pytest.raises(CheckpointError):
            _check_consistent(p)
    raw = json.dumps({"w": {"dtype": "F32", "shape": [0, 2**20], "data_offsets": [0, 0]}}).encode()
    p.write_bytes(_pack(raw, b""))
    assert _check_consistent(p) == 1


def test_deeply_nested_json_header(tmp_path):
    """Deep nesting (recursion bomb) ends in a CheckpointError, not a RecursionError."""
    p = tmp_path / "m.safetensors"
    p.write_bytes(_pack(b"[" * 200_000 + b"]" * 200_000, b""))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        open_checkpoint(p)
    p.write_bytes(_pack(b'{"w":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001, b""))
    with pytest.raises(CheckpointError):
        open_checkpoint(p)


# ----------------------------------------------------------------------------- PyTorch (.bin) files

N_TORCH_CASES = 300


def test_fuzz_torch_files_only_surgery_errors(tmp_path):
    """Truncated and byte-flipped .bin files (zip and legacy formats): SurgeryError or consistent tensors.

    torch.load of a damaged file raises anything (KeyError, IndexError, struct.error,
    AssertionError...); safe_torch_load must turn all of it into a CheckpointError."""
    import warnings

    g = torch.Generator().manual_seed(1)
    sd = {"a.weight": torch.randn(4, 6, generator=g), "b.ids": torch.arange(5), "c": torch.tensor(1.5)}
    zip_path, legacy_path = tmp_path / "zip.bin", tmp_path / "legacy.bin"
    torch.save(sd, zip_path)
    torch.save(sd, legacy_path, _use_new_zipfile_serialization=False)
    seeds = [zip_path.read_bytes(), legacy_path.read_bytes()]
    rng = random.Random(SEED + 1)
    target = tmp_path / "fuzz.bin"
    outcomes = {"ok": 0, "error": 0}
    for case in range(N_TORCH_CASES):
        blob = bytearray(rng.choice(seeds))
        if rng.random() < 0.4:
            blob = blob[: rng.randrange(len(blob))]
        else:
            for _ in range(rng.randint(1, 4)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        target.write_bytes(bytes(blob))
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "Detected pickle protocol 151..." for flipped bytes
                idx = open_checkpoint(target)
                with LazyReader(idx) as r:
                    for name, t in r.iter():
                        assert tuple(t.shape) == idx.tensors[name].shape and t.dtype == idx.tensors[name].dtype
            outcomes["ok"] += 1
        except SurgeryError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001
            (tmp_path / f"case{case}.bin").write_bytes(bytes(blob))
            pytest.fail(f"case {case}: {type(e).__name__}: {e}")
        assert time.perf_counter() - t0 < PER_CASE_LIMIT_S, f"case {case}"
    assert outcomes["error"] > N_TORCH_CASES // 2 and outcomes["ok"] > 0, outcomes
