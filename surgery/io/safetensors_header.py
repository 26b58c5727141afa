"""A strict parser for safetensors headers.

We parse headers ourselves (instead of trusting the file) so that a hostile or
corrupt file ends in a one-line CheckpointError with bounded memory: the header
length is capped, every offset is checked against the file size, ranges must be
contiguous and in order, and shape x dtype must match the byte length.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

# safetensors dtype string <-> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A real header is a few MB at most (a 70B model has ~1000 tensors per shard).
MAX_HEADER_BYTES = 100 * 1024 * 1024
_MAX_DIM = 2**63  # torch sizes are int64


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _short(x: object, limit: int = 80) -> str:
    """repr(x), cut: a hostile header must not turn into a megabyte error message."""
    r = repr(x)
    return r if len(r) <= limit else r[:limit] + "…"


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: corrupt safetensors file ({what}); re-download or re-save the checkpoint"
    )


def read_header(path: Path) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """Parse and validate a safetensors header. Reads no tensor data.

    Returns (entries by name in file order of their data, metadata).
    """
    path = Path(path)
    raw, n, size = _read_header_bytes(path)
    header = _parse_header_json(path, raw)
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")
    entries = [_entry(path, name, info, data_start, data_len) for name, info in header.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    _check_contiguous(path, entries, data_start, size)
    return {e.name: e for e in entries}, metadata


def _read_header_bytes(path: Path) -> tuple[bytes, int, int]:
    """The header's JSON bytes, its declared length (checked against the cap and the file), the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise _bad(path, f"declared header length {n} exceeds {MAX_HEADER_BYTES} bytes")
            if 8 + n > size:
                raise _bad(path, f"declared header length {n} runs past the end of the {size}-byte file")
            return f.read(n), n, size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse_header_json(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(path, f"header is not valid JSON: {type(e).__name__}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    return header


def _entry(path: Path, name: str, info: object, data_start: int, data_len: int) -> HeaderEntry:
    """One tensor's entry, checked: dtype known, shape valid, offsets inside the data and matching the shape."""
    if not isinstance(info, dict):
        raise _bad(path, f"entry {_short(name)} is not an object")
    dt = info.get("dtype")
    if not isinstance(dt, str) or dt not in DTYPES:
        raise _bad(path, f"tensor {_short(name)} has unknown dtype {_short(dt)}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(
        type(d) is int and 0 <= d < _MAX_DIM for d in shape
    ) or math.prod(d for d in shape if d) >= _MAX_DIM:
        # torch sizes are int64; an empty tensor with huge other dims would overflow in reshape
        raise _bad(path, f"tensor {_short(name)} has an invalid shape {_short(shape)}")
    offs = info.get("data_offsets")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise _bad(path, f"tensor {_short(name)} has invalid data_offsets {_short(offs)}")
    if offs[1] > data_len:
        raise _bad(path, f"tensor {_short(name)} ends at byte {offs[1]} past the data end {data_len} "
                         "(truncated file?)")
    itemsize = torch.empty((), dtype=DTYPES[dt]).element_size()
    expected = math.prod(shape) * itemsize
    if offs[1] - offs[0] != expected:
        raise _bad(
            path,
            f"tensor {_short(name)}: shape {shape} x {dt} needs {expected} bytes "
            f"but offsets span {offs[1] - offs[0]}",
        )
    return HeaderEntry(name, DTYPES[dt], tuple(shape), data_start + offs[0], data_start + offs[1])


def _check_contiguous(path: Path, entries: list[HeaderEntry], data_start: int, size: int) -> None:
    """Sorted entries must tile the data section exactly: no overlap, no gap, nothing after."""
    pos = data_start
    for entry in entries:
        if entry.start != pos:
            what = "overlap" if entry.start < pos else "a gap"
            raise _bad(path, f"tensor {_short(entry.name)} data ranges have {what} at byte {entry.start - data_start}")
        pos = entry.end
    if pos != size:
        data_len = size - data_start
        raise _bad(path, f"{size - pos} bytes after the last tensor (data ends at {pos - data_start} of {data_len})")
