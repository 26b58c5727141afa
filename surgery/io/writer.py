"""Streaming, atomic output.

`atomic_output_dir` gives a temporary sibling directory that is renamed into
place only when the block succeeds, so an interrupted run never leaves a
complete-looking output. `ShardedWriter` streams tensors into safetensors shards
(cut at a size limit) inside such a directory: each tensor's bytes go straight
to a spill file, and the shard file is assembled (header, then data) when the
shard closes, so memory is bounded by the tensor in flight, not by shard size.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import OptionError, OutputError
from .safetensors_header import DTYPE_NAMES

TMP_TAG = ".surgery-tmp-"

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise OptionError(
                f"invalid size {text!r}; use a number with an optional unit, e.g. 5GB, 500MB, 2GiB"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise OptionError(f"invalid size {text!r}; it must be positive")
    return value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove temp dirs left by killed runs for this output (their pid is gone)."""
    removed = []
    for p in out.parent.glob(f".{out.name}{TMP_TAG}*"):
        m = re.search(re.escape(TMP_TAG) + r"(\d+)-", p.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_output_path(out: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Validate the output location before any work is done."""
    out = Path(out)
    ro = out.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        root = ri if ri.is_dir() else ri.parent
        if ro == ri or ro == root:
            raise OutputError(f"output {out} is the input {inp}; "
                              "choose another output path (inputs are never modified)")
        if ro.is_relative_to(root) and ri.is_dir():
            raise OutputError(f"output {out} is inside the input directory {inp}; choose a path outside it")
        if ri.is_relative_to(ro):  # --overwrite would delete the input
            raise OutputError(f"output {out} contains the input {inp}; choose another output path")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory; remove it or choose another path")
    parent = ro.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {out}: {parent} is not a directory; choose another output path")
    # effective ids: what the process can do (a setuid/seteuid process differs from its real uid)
    eff = os.access in os.supports_effective_ids
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=eff):
        raise OutputError(f"cannot write to {parent} (permission denied); choose a writable output location")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temp sibling dir; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    check_output_path(out, overwrite, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out.parent} ({e.strerror or e})") from None
    clean_stale_temps(out)
    tmp = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot create a temporary directory beside {out} ({e.strerror or e})") from None
    try:
        yield tmp
        old = None
        if out.exists():
            if not overwrite:  # appeared while we worked
                raise OutputError(f"output {out} appeared while writing; pass --overwrite to replace it")
            old = out.parent / f".{out.name}{TMP_TAG}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            code = errno.errorcode.get(e.errno or 0, "")
            raise OutputError(
                f"writing {out} failed ({e.strerror or e}{', ' + code if code else ''}); nothing was written"
            ) from None
        raise


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().data


NON_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx.data", ".h5", ".msgpack", ".gguf",
                       ".ckpt")


def non_weight_files(src: Path) -> list[Path]:
    """Top-level config/tokenizer files of a model directory (no weights, no index)."""
    if not src.is_dir():
        return []
    out = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(NON_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        out.append(p)
    return out


def _small_config_dir(d: Path, limit: int = 10 * 2**20) -> bool:
    """A sub-directory of configs only: no weight files, no links, under `limit` bytes."""
    total = 0
    for p in d.rglob("*"):
        if p.is_symlink() or (p.is_file() and p.name.endswith(NON_WEIGHT_SUFFIXES)):
            return False
        if p.is_file():
            total += p.stat().st_size
            if total > limit:
                return False
    return True


def _header_bytes(header: dict) -> bytes:
    """The 8-byte length and the JSON header, padded so the data starts 8-byte aligned."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Stream tensors into safetensors shards in an atomic output directory."""

    def __init__(
        self,
        out_dir: str | Path,
        shard_size: int | str | None = "5GB",
        overwrite: bool = False,
        basename: str = "model",
        metadata: dict[str, str] | None = None,
        inputs: Iterable[Path] = (),
    ):
        self.out_dir = Path(out_dir)
        self.shard_size = parse_size(shard_size) if shard_size is not None else None
        self.basename = basename
        self.metadata = {"format": "pt", **(metadata or {})}
        self._ctx = atomic_output_dir(self.out_dir, overwrite, inputs)
        self.tmp_dir: Path | None = None
        self._shards: list[tuple[Path, dict]] = []  # (final temp file, header)
        self._names: set[str] = set()
        self._spill: BinaryIO | None = None
        self._header: dict = {}
        self._pos = 0
        self.total_size = 0
        self._planned: list[list[tuple[str, tuple, torch.dtype]]] | None = None
        self._next = (0, 0)  # (shard, entry) expected next in planned mode
        self._direct: BinaryIO | None = None  # the open shard file in planned mode

    def __enter__(self) -> ShardedWriter:
        self.tmp_dir = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        finish_error = None
        try:
            if exc_type is None:
                self._finish()
        except BaseException as e:  # noqa: BLE001 - re-raised below after cleanup
            finish_error = e
            exc_type, exc, tb = type(e), e, e.__traceback__
        finally:
            for fh in (self._spill, self._direct):
                if fh is not None:
                    fh.close()
            self._spill = self._direct = None
        suppressed = self._ctx.__exit__(exc_type, exc, tb)
        if finish_error is not None and not suppressed:
            raise finish_error
        return suppressed

    @property
    def _dir(self) -> Path:
        """The temporary output directory (set by __enter__)."""
        if self.tmp_dir is None:
            raise RuntimeError("ShardedWriter used outside its `with` block")
        return self.tmp_dir

    # -- tensors -------------------------------------------------------------
    def plan(self, entries: Iterable[tuple[str, tuple, torch.dtype]]) -> None:
        """Announce every tensor (name, shape, dtype) in the order it will be added.

        Each shard's header is then known before its data, so tensors are written
        straight into the shard file: no spill file, half the bytes written."""
        if self._names or self._spill is not None:
            raise OutputError("plan() must come before the first add()")
        shards: list[list[tuple[str, tuple, torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in entries:
            if dtype not in DTYPE_NAMES:
                raise OutputError(f"tensor {name!r} has dtype {dtype} that safetensors cannot store")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if self.shard_size and nbytes and shards[-1] and size + nbytes > self.shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        self._planned = shards

    def _open_planned(self, i: int) -> None:
        assert self._planned is not None  # add_blocks checked
        header, pos = {}, 0
        for name, shape, dtype in self._planned[i]:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        self._direct = open(self._dir / f".shard{i}.safetensors", "wb")
        self._direct.write(_header_bytes({"__metadata__": self.metadata, **header}))
        self._header = header

    def _add_planned(self, name: str, tensor: torch.Tensor) -> None:
        self.add_blocks(name, tuple(tensor.shape), tensor.dtype, [tensor])

    def add_blocks(self, name: str, shape: tuple, dtype: torch.dtype, blocks: Iterable[torch.Tensor]) -> None:
        """Planned mode: write one announced tensor from consecutive row blocks, so a
        tensor that passes through unchanged never has to be in memory whole."""
        if self._planned is None:
            raise OutputError("add_blocks() needs plan() first")
        i, j = self._next
        if i >= len(self._planned) or j >= len(self._planned[i]):
            raise OutputError(f"tensor {name!r} was not announced in plan()")
        want = self._planned[i][j]
        if (name, tuple(shape), dtype) != want:
            raise OutputError(f"tensor {name!r} {tuple(shape)} {dtype} differs from the plan {want}")
        if j == 0:
            self._open_planned(i)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        written = 0
        assert self._direct is not None  # opened for the shard's first tensor (j == 0)
        for block in blocks:
            if block.dtype != dtype:
                raise OutputError(f"tensor {name!r}: a block has dtype {block.dtype}, expected {dtype}")
            self._direct.write(tensor_bytes(block))
            written += block.numel() * block.element_size()
        if written != nbytes:
            raise OutputError(f"tensor {name!r}: {written} bytes written, {nbytes} announced")
        self.total_size += nbytes
        self._names.add(name)
        if j + 1 == len(self._planned[i]):
            self._direct.close()
            self._direct = None
            self._shards.append((self._dir / f".shard{i}.safetensors", self._header))
            self._next = (i + 1, 0)
        else:
            self._next = (i, j + 1)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._planned is not None:
            return self._add_planned(name, tensor)
        if name in self._names:
            raise OutputError(f"tensor {name!r} written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise OutputError(f"tensor {name!r} has dtype {tensor.dtype} that safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        if (self._spill is not None and self.shard_size and nbytes and self._pos
                and self._pos + nbytes > self.shard_size):
            self._close_shard()
        if self._spill is None:
            self._spill = open(self._dir / f".shard{len(self._shards)}.data", "wb")
            self._header, self._pos = {}, 0
        self._spill.write(tensor_bytes(tensor))
        self._header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._pos, self._pos + nbytes],
        }
        self._pos += nbytes
        self.total_size += nbytes
        self._names.add(name)

    def _close_shard(self) -> None:
        assert self._spill is not None  # callers check
        spill_path = Path(self._spill.name)
        self._spill.close()
        self._spill = None
        final = self._dir / f".shard{len(self._shards)}.safetensors"
        with open(final, "wb") as f, open(spill_path, "rb") as data:
            f.write(_header_bytes({"__metadata__": self.metadata, **self._header}))
            shutil.copyfileobj(data, f, 16 * 2**20)
        spill_path.unlink()
        self._shards.append((final, self._header))

    def _finish(self) -> None:
        if self._planned is not None:
            if self._next != (len(self._planned), 0) and any(self._planned):
                raise OutputError(f"only {len(self._names)} of the planned tensors were written")
            if not any(self._planned):
                self._planned = None  # nothing announced: fall through to an empty file
        if self._planned is None and (self._spill is not None or not self._shards):
            if self._spill is None:  # nothing written: still a valid empty file
                self._spill = open(self._dir / ".shard0.data", "wb")
                self._header, self._pos = {}, 0
            self._close_shard()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self._dir / f"{self.basename}.safetensors")
            return
        weight_map = {}
        for i, (path, header) in enumerate(self._shards, 1):
            fname = f"{self.basename}-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self._dir / fname)
            for tname in header:
                weight_map[tname] = fname
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        self.write_json(f"{self.basename}.safetensors.index.json", index)

    # -- other files -----------------------------------------------------------
    def write_json(self, name: str, obj) -> Path:
        p = self._dir / name
        p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return p

    def copy_files(self, src_dir: Path, names: Iterable[str] | None = None) -> list[str]:
        """Copy non-weight files (config, tokenizer...) from src_dir; all of them if names is None.

        With names=None, small sub-directories holding no weights (sentence-transformers'
        1_Pooling/, for example) are copied too."""
        src_dir = Path(src_dir)
        files = non_weight_files(src_dir) if names is None else [src_dir / n for n in names if (src_dir / n).is_file()]
        for p in files:
            shutil.copy2(p, self._dir / p.name)
        copied = [p.name for p in files]
        if names is None and src_dir.is_dir():
            for sub in sorted(src_dir.iterdir()):
                if sub.is_dir() and not sub.name.startswith(".") and _small_config_dir(sub):
                    shutil.copytree(sub, self._dir / sub.name)
                    copied.append(sub.name + "/")
        return copied


def check_report_path(path: str | Path, inputs: Iterable[Path] = (), overwrite: bool = False) -> Path:
    """Validate a --report file location before any work: never an input, never inside
    an input directory, its directory must exist, an existing file needs overwrite."""
    p = Path(path)
    rp = p.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        if rp == ri or (ri.is_dir() and rp.is_relative_to(ri)):
            raise OutputError(f"report {p} would be written into the input {inp}; choose another path")
    if not rp.parent.is_dir():
        raise OutputError(f"the directory of report {p} does not exist; create it or choose another path")
    if p.is_dir():
        raise OutputError(f"report {p} is a directory; give a file name")
    if p.exists() and not overwrite:
        raise OutputError(f"report {p} already exists; pass --overwrite to replace it")
    return p


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file through a temporary sibling and rename it into place."""
    p = Path(path)
    tmp = p.parent / f".{p.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {p} ({e.strerror or e})") from None
