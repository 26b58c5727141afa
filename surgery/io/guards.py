"""Defensive helpers for everything the tool reads: names, JSON, files, links.

- `escape_name` makes any tensor or file name safe to put in a one-line message.
- `load_json` / `decode_json` parse JSON with a size cap, a nesting cap, no duplicate
  keys and no absurd numbers, so a hostile file ends in one SurgeryError line instead
  of a RecursionError, a ValueError or gigabytes of memory.
- `open_regular` / `check_regular` refuse FIFOs, devices and sockets before reading
  (a FIFO named model.safetensors would otherwise block forever).
- `source_root` / `resolves_inside` decide which symlinks in a checkpoint directory
  are legitimate: those that stay inside it, or inside the Hugging Face hub cache repo
  when the directory is a cache snapshot (files there are links to ../../blobs/).
- `check_output_file` validates a file output (a report, a plot) before any work: never an
  input, never inside an input directory or another output; `staged_text` writes a report
  beside its place before the main output is written, and moves it in only with it.
- `check_regex` (from surgery.options.patterns, torch-free) refuses user regexes that could
  backtrack for ever on a hostile module name.

Torch-free, so options and ops can use it too.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from io import BufferedReader
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, OutputError, SurgeryError
from ..options.patterns import MAX_REGEX_CHARS, check_regex  # torch-free, so options use it too

__all__ = ["escape_name", "load_json", "decode_json", "JSONRefused", "json_shape", "check_regular", "open_regular",
           "hub_cache_repo", "source_root", "resolves_inside", "check_output_file", "staged_text", "check_regex",
           "MAX_REGEX_CHARS", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_NUMBER_CHARS", "gc_paused"]

# config.json / index.json / adapter_config.json: the largest real ones (a sharded
# index of a 100k-tensor model) are ~10 MB.
MAX_JSON_BYTES = 32 * 2**20
# Real configs nest 4-5 levels; 64 is far above that and far below Python's recursion limit.
MAX_JSON_DEPTH = 64
# int64 needs 20 digits and a float repr 24 characters; 5000 digits is an attack on int().
MAX_NUMBER_CHARS = 100

_HUB_REPO = re.compile(r"(models|datasets|spaces)--.+")


def escape_name(name: object, limit: int | None = None) -> str:
    """A name made safe for a one-line message, like repr() without the quotes.

    Printable characters stay as they are (so 'é' and '中' read normally); a backslash
    is doubled; control, format, separator and unassigned characters become \\xNN,
    \\uNNNN or \\UNNNNNNNN; a byte Python decoded with surrogateescape (a non-UTF-8 file
    name) shows as the byte, \\xNN.

    Args:
        name: a str, or a path (or anything: str() is used).
        limit: cut the result to this many characters, ending in '…' (None: no cut).

    Returns:
        The escaped text: never contains a newline or a terminal control sequence.

    Example:
        >>> escape_name("layer\\n0\\x1b[2J.weight")
        'layer\\\\n0\\\\x1b[2J.weight'
    """
    s = os.fspath(name) if isinstance(name, os.PathLike) else name
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    s = str(s)
    out = []
    for ch in s:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif 0xDC80 <= o <= 0xDCFF:  # surrogateescape: the original byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    text = "".join(out)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return text


# ----------------------------------------------------------------------------- JSON


class JSONRefused(ValueError):
    """decode_json's reason for refusing a document (callers turn it into a SurgeryError)."""


_CHUNK = 1 << 20
_KEEP_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_TO_PARENS = bytes.maketrans(b"[{]}", b"(())")
_LONG_NUMBER = re.compile(rb"[-+0-9.eE]{%d,}" % (MAX_NUMBER_CHARS + 1))


def _outside_strings(raw: bytes) -> tuple[bytes, int]:
    """The JSON text with every string literal cut out, and the number of strings.

    Escapes go first (an escaped backslash, then an escaped quote), so the quotes left
    alternate open/close; the text between them is dropped chunk by chunk (bytes.split
    in C, bounded temporary memory), carrying whether a chunk starts inside a string."""
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    n_quotes = text.count(b'"')
    if not n_quotes:
        return text, 0
    out, inside = [], 0
    for i in range(0, len(text), _CHUNK):
        pieces = text[i:i + _CHUNK].split(b'"')
        out.append(b"".join(pieces[inside::2]))
        inside = (inside + len(pieces) - 1) % 2
    return b"".join(out), n_quotes // 2


def json_shape(raw: bytes, max_depth: int) -> tuple[int, int]:
    """(containers, strings) in a JSON text; refuses nesting deeper than max_depth and
    number literals longer than MAX_NUMBER_CHARS, before anything is parsed.

    Linear, non-recursive and in C: strings are cut out, the brackets kept, and one level
    of innermost pairs is removed per pass (at most max_depth passes).

    Raises:
        JSONRefused: the nesting is too deep, the brackets do not balance, or a number
        is absurdly long (Python's int() refuses over 4300 digits with a ValueError).

    Example:
        >>> json_shape(b'{"a": [1, "]"]}', 8)
        (2, 2)
    """
    outside, n_strings = _outside_strings(raw)
    m = _LONG_NUMBER.search(outside)
    if m:
        raise JSONRefused(f"a number of {m.end() - m.start()} characters, over {MAX_NUMBER_CHARS}")
    rest = outside.translate(_TO_PARENS, _KEEP_BRACKETS)
    containers = rest.count(b"(")
    for _ in range(max_depth):
        if not rest:
            break
        rest = rest.replace(b"()", b"")
    if b"()" in rest:  # a pair survived max_depth passes: it sits deeper than max_depth
        raise JSONRefused(f"nested deeper than {max_depth} levels")
    # anything else left is unbalanced, i.e. invalid JSON: json.loads says where
    if len(rest) > max_depth:
        raise JSONRefused(f"unbalanced brackets, or nested deeper than {max_depth} levels")
    return containers, n_strings


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise JSONRefused(f"duplicate key '{escape_name(k, 80)}'")
            seen.add(k)
    return d


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many acyclic objects (a parsed
    JSON document): otherwise every 700 allocations trigger a collection that walks the
    ever-growing heap, and parsing a large header turns quadratic (minutes at 100 MB)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def decode_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH, max_containers: int | None = None) -> Any:
    """Parse UTF-8 JSON bytes strictly. Raises JSONRefused(reason) on anything unsafe.

    Refused: invalid UTF-8 or JSON, nesting deeper than max_depth, a key twice in one
    object, a number literal over MAX_NUMBER_CHARS characters; more than max_containers
    objects and arrays (when given: a cheap bound on the
    memory the parsed value takes, checked before parsing). NaN/Infinity (which Python's
    json writes) are accepted.

    Example:
        >>> decode_json(b'{"a": [1, 2.5]}')
        {'a': [1, 2.5]}
    """
    containers, _ = json_shape(raw, max_depth)
    if max_containers is not None and containers > max_containers:
        raise JSONRefused(f"{containers} objects and arrays in {len(raw)} bytes, over {max_containers}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONRefused(f"not UTF-8 at byte {e.start}") from None
    try:
        with gc_paused():
            return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise JSONRefused(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except (RecursionError, MemoryError) as e:  # belt and braces: json_shape bounds the depth
        raise JSONRefused(f"{type(e).__name__} while parsing") from None
    except ValueError as e:  # JSONRefused from a hook, or int()'s own digit limit
        if isinstance(e, JSONRefused):
            raise
        raise JSONRefused(" ".join(str(e).split())[:100]) from None


def load_json(source: str | os.PathLike | bytes, what: str | None = None, *,
              error: type[SurgeryError] = CheckpointError, expect: type | None = dict,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read and parse a JSON file (or bytes) the safe way; the one JSON loader of the tool.

    Args:
        source: a path (must be a regular file: a FIFO or device is refused unread) or the
            raw bytes.
        what: how to name the source in messages (default: the path; 'JSON' for bytes);
            escaped with escape_name, so pass it raw.
        error: the SurgeryError subclass to raise (CheckpointError; AdapterError for an
            adapter_config.json, OptionError for a user's file...).
        expect: the type the top level must have (dict: a JSON object); None for any.
        max_bytes: larger files are refused before they are read.
        max_depth: deeper nesting is refused before it is parsed.

    Returns:
        The parsed value.

    Raises:
        error: one line naming the file, what is wrong, and the fix. Never RecursionError,
        ValueError or UnicodeDecodeError.

    Example:
        >>> cfg = load_json(Path("model/config.json"))                       # doctest: +SKIP
        >>> cfg = load_json(p, error=AdapterError)                            # doctest: +SKIP
    """
    if isinstance(source, (bytes, bytearray)):
        name, raw = escape_name(what or "JSON"), bytes(source)
        if len(raw) > max_bytes:
            raise error(f"{name}: {len(raw)} bytes of JSON, over the {max_bytes}-byte limit; is it the right file?")
    else:
        name = escape_name(what or source)
        with open_regular(source, error=error, what=what) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise error(f"{name}: {size} bytes, over the {max_bytes}-byte limit for a JSON file; "
                            f"is it the right file?")
            try:
                raw = f.read(max_bytes + 1)
            except OSError as e:
                raise error(f"{name}: cannot read ({e.strerror or e})") from None
    try:
        data = decode_json(raw, max_depth)
    except JSONRefused as e:
        raise error(f"{name}: not valid JSON ({e}); fix or re-download the file") from None
    if expect is not None and not isinstance(data, expect):
        kind = "a JSON object" if expect is dict else f"JSON {expect.__name__}"
        raise error(f"{name}: expected {kind}, found {type(data).__name__}; fix or re-download the file")
    return data


# ----------------------------------------------------------------------------- files

_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | os.PathLike, error: type[SurgeryError] = CheckpointError,
                  what: str | None = None) -> os.stat_result:
    """stat() a path (following links) and refuse anything but a regular file, unopened.

    Returns:
        The stat result.

    Raises:
        error: missing, unreadable, or a FIFO/device/socket/directory.

    Example:
        >>> check_regular("model.safetensors").st_size                         # doctest: +SKIP
    """
    name = escape_name(what or path)
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: an embedded NUL
        raise error(f"{name}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{name}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
    return st


def open_regular(path: str | os.PathLike, error: type[SurgeryError] = CheckpointError,
                 what: str | None = None) -> BufferedReader:
    """Open a regular file for binary reading; never blocks on a FIFO, never opens a device.

    The path is checked with stat() before opening, and the open file again with fstat()
    (the path could be swapped in between); the open itself is non-blocking.

    Returns:
        A binary file object (use it as a context manager).

    Raises:
        error: as check_regular, or the open failed.

    Example:
        >>> with open_regular(path) as f:                                       # doctest: +SKIP
        ...     head = f.read(8)
    """
    name = escape_name(what or path)
    check_regular(path, error, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"{name}: cannot open ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{name}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return open(fd, "rb")  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise


# ----------------------------------------------------------------------------- links


def hub_cache_repo(directory: str | os.PathLike) -> Path | None:
    """The cache repo dir when `directory` is a Hugging Face hub cache snapshot, else None.

    A snapshot is …/models--org--name/snapshots/REV (datasets--/spaces-- too) whose repo
    dir has a blobs/ folder; the resolved path is what counts.

    Args:
        directory: a checkpoint directory.

    Returns:
        The resolved …/models--org--name, or None.

    Example:
        >>> hub_cache_repo("hub/models--org--m/snapshots/abc123")              # doctest: +SKIP
        PosixPath('/home/u/hub/models--org--m')
    """
    d = Path(directory).resolve()
    repo = d.parent.parent
    if d.parent.name == "snapshots" and _HUB_REPO.fullmatch(repo.name) and (repo / "blobs").is_dir():
        return repo
    return None


def source_root(directory: str | os.PathLike) -> Path:
    """Where the files of a checkpoint directory may resolve to: the directory itself
    (resolved), or its hub cache repo when it is a cache snapshot.

    Example:
        >>> source_root("~/.cache/huggingface/hub/models--o--m/snapshots/abc")  # doctest: +SKIP
        PosixPath('/home/u/.cache/huggingface/hub/models--o--m')
    """
    return hub_cache_repo(directory) or Path(directory).resolve()


def resolves_inside(path: str | os.PathLike, root: Path) -> bool:
    """Whether `path` exists and resolves (every link followed) to `root` or below it.

    Args:
        path: the file as named in the checkpoint directory.
        root: a resolved directory (see source_root).

    Returns:
        False for a dangling link, a link loop, or anything resolving elsewhere.

    Example:
        >>> resolves_inside(d / "model.safetensors", source_root(d))            # doctest: +SKIP
        True
    """
    try:
        return Path(path).resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


# ----------------------------------------------------------------------------- file outputs


def _refuse_overlap(p: Path, rp: Path, inputs: Iterable[str | os.PathLike], others: Iterable[str | os.PathLike],
                    what: str) -> None:
    """An output file must not be an input, sit inside an input directory, or overlap another output."""
    name = escape_name(p)
    for inp in inputs:
        ri = Path(inp).resolve()
        if rp == ri:
            raise OutputError(f"{what} {name} is the input {escape_name(inp)}; choose another path "
                              "(inputs are never modified)")
        if ri.is_dir() and rp.is_relative_to(ri):
            raise OutputError(f"{what} {name} would be written into the input directory {escape_name(inp)}; "
                              "choose a path outside it")
    for other in others:
        ro = Path(other).resolve()
        if rp == ro or rp.is_relative_to(ro):
            raise OutputError(f"{what} {name} {'is' if rp == ro else 'is inside'} the output {escape_name(other)}, "
                              "which is written as a whole; give them different paths")
        if ro.is_relative_to(rp):
            raise OutputError(f"output {escape_name(other)} is inside {what} {name}; give them different paths")


def check_output_file(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                      others: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                      what: str = "report") -> Path:
    """Validate where a file output (a JSON report, a plot) goes, before any work is done.

    Links are followed: a path that resolves to an input is refused like the input itself.

    Args:
        path: the file to write.
        inputs: every file or directory the command reads (models, adapters, calibration...).
        others: the command's other outputs (the -o directory): the file may not be one of
            them, sit inside one, or contain one.
        overwrite: whether an existing file may be replaced.
        what: how the message names the file ("report", "plot").

    Returns:
        The path, as a Path.

    Raises:
        OutputError: one line: equal to or inside an input, overlapping another output, an
        existing file without overwrite, a directory, a missing or unwritable directory.

    Example:
        >>> check_output_file("r.json", inputs=["model/"], others=["out/"])          # doctest: +SKIP
        PosixPath('r.json')
    """
    p = Path(path)
    name = escape_name(p)
    if "\x00" in str(p):
        raise OutputError(f"{what} path {name} contains a NUL character; choose another")
    rp = p.resolve()
    _refuse_overlap(p, rp, inputs, others, what)
    if not rp.parent.is_dir():
        raise OutputError(f"the directory of {what} {name} does not exist; create it or choose another path")
    if p.is_dir():
        raise OutputError(f"{what} {name} is a directory; give a file name")
    if os.path.lexists(p) and not overwrite:
        raise OutputError(f"{what} {name} already exists; set overwrite to replace it")
    eff = os.access in os.supports_effective_ids
    if not os.access(rp.parent, os.W_OK | os.X_OK, effective_ids=eff):
        raise OutputError(f"cannot write {what} {name}: {escape_name(rp.parent)} is not writable; "
                          "choose a writable location")
    return p


@contextlib.contextmanager
def staged_text(path: str | os.PathLike, text: str) -> Iterator[Path]:
    """Write TEXT into a temporary sibling of PATH now; move it into place when the block
    succeeds, remove it when the block fails.

    For a report that must land with the output it describes or not at all: a full disk is
    found before the block writes the output, and a failed output leaves no report.

    Args:
        path: the report's final path (validated before, see check_output_file).
        text: its content.

    Yields:
        The staged file (hidden, beside PATH).

    Raises:
        OutputError: the staged file cannot be written (ENOSPC: "No space left on device..."),
        nothing is left behind; or it cannot be moved into place.

    Example:
        >>> with staged_text("report.json", json.dumps(result)):           # doctest: +SKIP
        ...     write_adapter(out, ...)       # the report appears only if this succeeds
    """
    from .writer import _temp_path, write_text_atomic  # writer imports this module

    p = Path(path)
    staged = _temp_path(p)
    write_text_atomic(staged, text)
    try:
        yield staged
    except BaseException:  # KeyboardInterrupt (SIGTERM in the CLI) too: no staged file left
        with contextlib.suppress(OSError):
            staged.unlink()
        raise
    try:
        os.replace(staged, p)
    except OSError as e:
        with contextlib.suppress(OSError):
            staged.unlink()
        raise OutputError(f"cannot move {escape_name(p)} into place ({e.strerror or e}); choose another "
                          "path") from None
