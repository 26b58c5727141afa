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
import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import OutputError
from ..options.base import parse_size  # torch-free: the options objects parse sizes too
from .guards import escape_name, open_regular, resolves_inside, source_root
from .safetensors_header import DTYPE_NAMES

TMP_TAG = ".surgery-tmp-"


def _q(name: object) -> str:
    return f"'{escape_name(name, 200)}'"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):  # a pid no process can have
        return False
    return True


NAME_MAX = 255  # bytes in one path component (Linux, macOS)
PATH_MAX = 4096  # bytes in a path, with its terminating NUL (Linux)
_STEM_MAX = 64  # output names up to this many bytes keep their temp sibling readable


def _temp_stem(out: Path) -> str:
    """The name part of out's temp siblings ('.STEM.surgery-tmp-PID-[old-]HEX').

    A name over _STEM_MAX bytes is shortened to its first 24 bytes and a hash of the
    whole, so the sibling's name always fits in NAME_MAX whatever the output's name."""
    raw = os.fsencode(out.name)
    if len(raw) <= _STEM_MAX:
        return out.name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return f"{raw[:24].decode('utf-8', 'ignore')}~{digest}"


def _temp_path(out: Path, old: bool = False) -> Path:
    return out.parent / f".{_temp_stem(out)}{TMP_TAG}{os.getpid()}-{'old-' if old else ''}{uuid.uuid4().hex[:8]}"


_TEMP_TAIL = re.compile(r"(\d+)-(?:old-)?[0-9a-f]{8}")


def _remove(p: Path) -> None:
    """Remove a temp entry: a link or file is unlinked (never followed), a directory removed."""
    try:
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)
    except OSError:
        pass


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove temp entries left by killed runs for this output (their pid is gone),
    directories and links alike (`-o LINK --overwrite` moves the link aside)."""
    out = Path(out)
    prefix = f".{_temp_stem(out)}{TMP_TAG}"
    removed: list[Path] = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        m = _TEMP_TAIL.fullmatch(p.name[len(prefix):])
        if m and not _pid_alive(int(m.group(1))):
            _remove(p)
            removed.append(p)
    return removed


def _check_lengths(out: Path) -> None:
    """Refuse a name or path the file system cannot hold, as an OutputError (not OSError)."""
    for part in out.parts:
        n = len(os.fsencode(part))
        if n > NAME_MAX:
            raise OutputError(
                f"output path component '{escape_name(part, 60)}' is {n} bytes, over the {NAME_MAX}-byte limit "
                f"of a file name; choose a shorter name"
            )
    n = len(os.fsencode(os.path.abspath(out)))
    if n >= PATH_MAX:
        raise OutputError(
            f"output path '{escape_name(out, 60)}' is {n} bytes, over the {PATH_MAX - 1}-byte limit of a path; "
            f"choose a shorter path"
        )


def check_output_path(out: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Validate the output location before any work is done."""
    out = Path(out)
    try:
        os.fsencode(out)
    except UnicodeError:
        raise OutputError(
            f"output path '{escape_name(out)}' cannot be encoded as a file name; choose another"
        ) from None
    if "\x00" in str(out):
        raise OutputError(f"output path '{escape_name(out)}' contains a NUL character; choose another")
    _check_lengths(out)
    name = escape_name(out)
    ro = out.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        root = ri if ri.is_dir() else ri.parent
        if ro == ri or ro == root:
            raise OutputError(
                f"output {name} is the input {escape_name(inp)}; choose another output path (inputs are never modified)"
            )
        if ro.is_relative_to(root) and ri.is_dir():
            raise OutputError(
                f"output {name} is inside the input directory {escape_name(inp)}; choose a path outside it"
            )
        if ri.is_relative_to(ro):  # --overwrite would delete the input
            raise OutputError(f"output {name} contains the input {escape_name(inp)}; choose another output path")
    exists = os.path.lexists(out)  # a broken link is there too
    if exists and not overwrite:
        raise OutputError(f"output {name} already exists; pass --overwrite to replace it")
    if exists and out.exists() and not out.is_dir():
        raise OutputError(f"output {name} exists and is not a directory; remove it or choose another path")
    parent = ro.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {name}: {escape_name(parent)} is not a directory; choose another output path")
    # effective ids: what the process can do (a setuid/seteuid process differs from its real uid)
    eff = os.access in os.supports_effective_ids
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=eff):
        raise OutputError(
            f"cannot write to {escape_name(parent)} (permission denied); choose a writable output location"
        )


def _make_parents(out: Path) -> list[Path]:
    """Create out's missing parent directories; return those created, deepest first."""
    missing = []
    d = out.parent
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_parents(missing)
        raise OutputError(f"cannot create {escape_name(out.parent)} ({e.strerror or e})") from None
    return missing


def _remove_parents(created: list[Path]) -> None:
    for d in created:  # deepest first; a directory someone else filled meanwhile stays
        try:
            d.rmdir()
        except OSError:
            break


_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _write_error(e: OSError, out: Path, tmp: Path) -> OutputError:
    """One line for an OSError while writing: which file, why, what to do."""
    where = out
    if e.filename:
        try:
            where = out / Path(os.fsdecode(e.filename)).relative_to(tmp)
        except ValueError:
            where = Path(os.fsdecode(e.filename))
    code = errno.errorcode.get(e.errno or 0, "")
    if e.errno in _NO_SPACE:
        return OutputError(
            f"No space left on device writing {escape_name(where)} ({code}); free some space or choose another "
            f"output location; nothing was written"
        )
    return OutputError(
        f"writing {escape_name(where)} failed ({e.strerror or e}{', ' + code if code else ''}); nothing was written"
    )


def _cleanup(tmp: Path, created: list[Path]) -> None:
    """Remove the temp dir and the parents made for the output; a second Ctrl-C/SIGTERM
    during the cleanup does not cut it short."""
    for _ in range(3):
        try:
            _remove(tmp)
            _remove_parents(created)
            return
        except KeyboardInterrupt:
            continue


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temp sibling dir; on success it replaces `out`, on error it is removed.

    On any error (KeyboardInterrupt included, which the CLI also raises for SIGTERM) the
    temp dir and any parent directories created for `out` are removed; an OSError
    becomes a one-line OutputError (ENOSPC: "No space left on device writing X")."""
    out = Path(out)
    check_output_path(out, overwrite, inputs)
    created = _make_parents(out)
    clean_stale_temps(out)
    tmp = _temp_path(out)
    try:
        tmp.mkdir()
    except OSError as e:
        _remove_parents(created)
        raise OutputError(
            f"cannot create a temporary directory beside {escape_name(out)} ({e.strerror or e})"
        ) from None
    try:
        yield tmp
        old = None
        if os.path.lexists(out):
            if not overwrite:  # appeared while we worked
                raise OutputError(f"output {escape_name(out)} appeared while writing; pass --overwrite to replace it")
            old = _temp_path(out, old=True)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            _remove(old)  # a directory, or the link `-o LINK --overwrite` replaced (its target stays)
    except BaseException as e:
        _cleanup(tmp, created)
        if isinstance(e, OSError):
            raise _write_error(e, out, tmp) from None
        raise


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().data


NON_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx.data", ".h5", ".msgpack", ".gguf",
                       ".ckpt")


def _unsafe(p: Path, allowed: Path) -> str | None:
    """Why a side file must not be copied, or None. Only regular files that resolve inside
    `allowed` qualify: a link out of the model directory (to ~/.ssh/id_rsa,
    /proc/self/environ...) or a FIFO/device would copy what is not the model's."""
    try:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            if not os.path.exists(p):
                return "a broken link"
            if not resolves_inside(p, allowed):
                return "a link that leaves the model directory"
            st = os.stat(p)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None if stat.S_ISREG(st.st_mode) else "not a regular file"


def _side_files(src: Path) -> tuple[list[Path], list[str]]:
    """(top-level non-weight files to copy, 'name: why' for those skipped as unsafe)."""
    if not src.is_dir():
        return [], []
    allowed = source_root(src)
    files, skipped = [], []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name.endswith(NON_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        if p.is_dir() and not p.is_symlink():
            continue  # sub-directories: see _config_dir_files
        why = _unsafe(p, allowed)
        if why is None:
            files.append(p)
        elif why != "not a regular file" or not p.is_dir():
            skipped.append(f"{escape_name(p.name)}: {why}")
    return files, skipped


def non_weight_files(src: Path) -> list[Path]:
    """Top-level config/tokenizer files of a model directory (no weights, no index).

    Only regular files that resolve inside the directory (or inside its hub cache repo,
    for a cache snapshot) are listed: links out of it and special files are not."""
    return _side_files(Path(src))[0]


def _config_dir_files(d: Path, allowed: Path, limit: int = 10 * 2**20,
                      max_files: int = 1000) -> list[tuple[Path, Path]] | None:
    """(relative path, source) of every file of a small config-only sub-directory, or None
    when it is not one: weight files, sub-directory links, unsafe files (see _unsafe),
    over `limit` bytes or `max_files` files."""
    if d.is_symlink() and not resolves_inside(d, allowed):
        return None
    out, total = [], 0
    for dirpath, dirnames, filenames in os.walk(d):  # does not follow directory links
        here = Path(dirpath)
        if any((here / n).is_symlink() for n in dirnames):
            return None
        for n in filenames:
            p = here / n
            if n.endswith(NON_WEIGHT_SUFFIXES) or _unsafe(p, allowed) is not None:
                return None
            total += p.stat().st_size
            out.append((p.relative_to(d), p))
            if total > limit or len(out) > max_files:
                return None
    return out


def _copy_regular(src: Path, dst: Path) -> None:
    """Copy a regular file's bytes (never blocking on a FIFO swapped in) and its times."""
    with open_regular(src, error=OutputError) as fsrc, open(dst, "wb") as fdst:
        shutil.copyfileobj(fsrc, fdst, 2**20)
    shutil.copystat(src, dst)


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
        self.skipped: list[str] = []  # side files copy_files left out as unsafe, 'name: why'

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
            close_error = self._close_files()
            if close_error is not None and finish_error is None and exc_type is None:
                finish_error = close_error  # e.g. ENOSPC on the last flush: the output is incomplete
                exc_type, exc, tb = type(close_error), close_error, close_error.__traceback__
        suppressed = self._ctx.__exit__(exc_type, exc, tb)
        if finish_error is not None and not suppressed:
            raise finish_error
        return suppressed

    def _close_files(self) -> BaseException | None:
        """Close the open shard/spill files; an error on close (a flush hitting ENOSPC)
        is returned, not raised, so the temp directory is still removed."""
        error = None
        for fh in (self._spill, self._direct):
            if fh is not None:
                try:
                    fh.close()
                except OSError as e:
                    error = error or e
        self._spill = self._direct = None
        return error

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
                raise OutputError(f"tensor {_q(name)} has dtype {dtype} that safetensors cannot store")
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
            raise OutputError(f"tensor {_q(name)} was not announced in plan()")
        want = self._planned[i][j]
        if (name, tuple(shape), dtype) != want:
            raise OutputError(f"tensor {_q(name)} {tuple(shape)} {dtype} differs from the plan {want}")
        if j == 0:
            self._open_planned(i)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        written = 0
        assert self._direct is not None  # opened for the shard's first tensor (j == 0)
        for block in blocks:
            if block.dtype != dtype:
                raise OutputError(f"tensor {_q(name)}: a block has dtype {block.dtype}, expected {dtype}")
            self._direct.write(tensor_bytes(block))
            written += block.numel() * block.element_size()
        if written != nbytes:
            raise OutputError(f"tensor {_q(name)}: {written} bytes written, {nbytes} announced")
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
            raise OutputError(f"tensor {_q(name)} written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise OutputError(f"tensor {_q(name)} has dtype {tensor.dtype} that safetensors cannot store")
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
        1_Pooling/, for example) are copied too. Only regular files that resolve inside
        src_dir are copied (inside the hub cache repo for a cache snapshot, whose files are
        links to its blobs/); links that leave it and special files are skipped, and
        listed in `self.skipped` as 'name: why'.

        Returns:
            The names copied ('1_Pooling/' for a sub-directory).
        """
        src_dir = Path(src_dir)
        allowed = source_root(src_dir) if src_dir.is_dir() else src_dir
        if names is None:
            files, skipped = _side_files(src_dir)
        else:
            files, skipped = [], []
            for n in names:
                p = src_dir / n
                why = _unsafe(p, allowed) if os.path.lexists(p) else "missing"
                if why is None:
                    files.append(p)
                elif why != "missing":
                    skipped.append(f"{escape_name(n)}: {why}")
        for p in files:
            _copy_regular(p, self._dir / p.name)
        copied = [p.name for p in files]
        if names is None and src_dir.is_dir():
            for sub in sorted(src_dir.iterdir()):
                if sub.is_dir() and not sub.name.startswith("."):
                    listing = _config_dir_files(sub, allowed)
                    if listing is None:
                        continue
                    for rel, p in listing:
                        (self._dir / sub.name / rel).parent.mkdir(parents=True, exist_ok=True)
                        _copy_regular(p, self._dir / sub.name / rel)
                    (self._dir / sub.name).mkdir(exist_ok=True)
                    copied.append(sub.name + "/")
        self.skipped.extend(skipped)
        return copied


def check_report_path(path: str | Path, inputs: Iterable[Path] = (), overwrite: bool = False) -> Path:
    """Validate a --report file location before any work: never an input, never inside
    an input directory, its directory must exist, an existing file needs overwrite."""
    p = Path(path)
    rp = p.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        if rp == ri or (ri.is_dir() and rp.is_relative_to(ri)):
            raise OutputError(
                f"report {escape_name(p)} would be written into the input {escape_name(inp)}; choose another path"
            )
    if not rp.parent.is_dir():
        raise OutputError(f"the directory of report {escape_name(p)} does not exist; create it or choose another path")
    if p.is_dir():
        raise OutputError(f"report {escape_name(p)} is a directory; give a file name")
    if p.exists() and not overwrite:
        raise OutputError(f"report {escape_name(p)} already exists; pass --overwrite to replace it")
    return p


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file through a temporary sibling and rename it into place."""
    p = Path(path)
    tmp = _temp_path(p)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except BaseException as e:  # KeyboardInterrupt (SIGTERM in the CLI) too: no temp left behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(e, p, tmp) from None
        raise
