"""A strict parser for safetensors headers.

We parse headers ourselves (instead of trusting the file) so that a hostile or
corrupt file ends in a one-line CheckpointError with bounded memory: the header
length is capped, every offset is checked against the file size, ranges must be
contiguous and in order, and shape x dtype must match the byte length.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .guards import JSONRefused, decode_json, escape_name, gc_paused, open_regular

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
_ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}

# Real headers are small: a shard of a 405B model lists ~1000 tensors (~150 KB), a
# single-file checkpoint with 100k tensors needs ~10 MB, and the largest __metadata__
# seen in the wild (LoRA training notes, thumbnails) is a few MB. 25 MiB leaves a wide
# margin while bounding the parse: JSON objects cost ~15x their text in memory, so a
# hostile header near the cap costs a few hundred MB (was 2.3 GB at the old 100 MB cap).
MAX_HEADER_BYTES = 25 * 2**20
# A tensor entry ("n":{"dtype":"U8","shape":[],"data_offsets":[0,0]},) is >= 50 bytes for
# 3 objects/arrays; more containers than 1 per 16 bytes is not a tensor table. Depth: the
# header, an entry, its shape (3); a little room for writers' extra fields.
_BYTES_PER_CONTAINER = 16
_MAX_DEPTH = 8
_MAX_DIM = 2**63  # torch sizes are int64


@dataclass(frozen=True, slots=True)
class HeaderEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _short(x: object, limit: int = 80) -> str:
    """A name or value for a message, escaped and cut: a hostile header must not turn
    into a megabyte (or multi-line) error message."""
    if isinstance(x, str):
        return f"'{escape_name(x, limit)}'"
    r = repr(x)
    return r if len(r) <= limit else r[:limit] + "…"


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{escape_name(path)}: corrupt safetensors file ({what}); re-download or re-save the checkpoint"
    )


def read_header(path: Path) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """Parse and validate a safetensors header. Reads no tensor data.

    Returns (entries by name in file order of their data, metadata).
    """
    path = Path(path)
    with open_regular(path) as f:  # a FIFO or device is refused before it is read
        raw, n, size = _read_raw_header(path, f)
    try:
        header = decode_json(raw, _MAX_DEPTH, max_containers=n // _BYTES_PER_CONTAINER + 8)
    except JSONRefused as e:
        raise _bad(path, f"header is not valid JSON ({e})") from None
    del raw
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    with gc_paused():  # ~10^5 small objects: no collections while they are built
        return _entries(path, header, 8 + n, size)


def _read_raw_header(path: Path, f) -> tuple[bytes, int, int]:
    """(header bytes, declared length, file size), with the length checked before reading."""
    try:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise _bad(path, f"declared header length {n} exceeds {MAX_HEADER_BYTES} bytes")
        if 8 + n > size:
            raise _bad(path, f"declared header length {n} runs past the end of the {size}-byte file")
        raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{escape_name(path)}: cannot read ({e.strerror or e})") from None
    if len(raw) != n:
        raise _bad(path, f"the file ended inside the {n}-byte header")
    return raw, n, size


def _entry(path: Path, name: str, info: object, data_start: int, data_len: int) -> HeaderEntry:
    """One tensor entry, checked: known dtype, int64 shape, offsets inside the data that
    span exactly shape x itemsize bytes."""
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
        raise _bad(path, f"tensor {_short(name)} ends at byte {offs[1]} past the data end {data_len} (truncated file?)")
    expected = math.prod(shape) * _ITEMSIZE[dt]
    if offs[1] - offs[0] != expected:
        raise _bad(
            path,
            f"tensor {_short(name)}: shape {shape} x {dt} needs {expected} bytes but offsets span {offs[1] - offs[0]}",
        )
    return HeaderEntry(name, DTYPES[dt], tuple(shape), data_start + offs[0], data_start + offs[1])


def _entries(path: Path, header: dict, data_start: int, size: int) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """Validate every entry against the file, then that the data ranges tile it exactly."""
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "__metadata__ must map strings to strings")
    entries = [_entry(path, name, info, data_start, data_len) for name, info in header.items()]
    header.clear()  # the parsed JSON is no longer needed: free it before sorting
    entries.sort(key=lambda e: (e.start, e.end))
    pos = data_start
    for e in entries:
        if e.start != pos:
            what = "overlap" if e.start < pos else "a gap"
            raise _bad(path, f"tensor {_short(e.name)} data ranges have {what} at byte {e.start - data_start}")
        pos = e.end
    if pos != size:
        raise _bad(path, f"{size - pos} bytes after the last tensor (data ends at {pos - data_start} of {data_len})")
    return {e.name: e for e in entries}, metadata
