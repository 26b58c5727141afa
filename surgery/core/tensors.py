"""Small tensor helpers shared by the commands: checks that stream in blocks so a
check never costs a full-size temporary (a bf16 isfinite upcasts to fp32 first), and
the memory check every operation runs before it allocates a tensor or an SVD's factors."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from surgery.errors import CheckpointError, ResourceError, ValidationError
from surgery.io.guards import escape_name

BLOCK = 1 << 20  # elements per block: a few MB of temporaries at most


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or ±inf (non-float tensors always are).

    A block's fp32 sum is NaN/inf whenever an element is (they propagate), and a sum
    costs one read with no temporary: 20x faster than isfinite on bf16 (measured on
    65M elements). Only a block whose sum is not finite (a NaN, or finite values that
    overflow the sum) is looked at element by element."""
    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    step = 4 * BLOCK
    for i in range(0, flat.numel(), step):
        block = flat[i : i + step]
        if bool(torch.isfinite(block.sum(dtype=torch.float32))):
            continue
        if not bool(torch.isfinite(_checkable(block)).all()):
            return False
    return True


def count_non_finite(t: torch.Tensor) -> int:
    """How many elements are NaN or ±inf, counted a block at a time (0 for non-float tensors)."""
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(_checkable(flat[i : i + BLOCK]))).sum()) for i in range(0, flat.numel(), BLOCK))


def _checkable(block: torch.Tensor) -> torch.Tensor:
    """isfinite has no float8 kernels: upcast 1-byte floats (a block at a time)."""
    return block.float() if block.element_size() == 1 else block


def check_finite(t: torch.Tensor, name: str, where: str | Path) -> None:
    """Refuse a tensor with NaN/Inf values before any math is done with it.

    Blockwise (see `all_finite`): never a full-size temporary; the count is only taken when
    the check fails.

    Args:
        t: the tensor as read (any dtype; non-float tensors always pass).
        name: the tensor's name, for the message.
        where: the checkpoint it comes from, for the message.

    Raises:
        CheckpointError: "NAME: N non-finite value(s) (NaN/Inf) in WHERE; ...".

    Example:
        >>> check_finite(torch.ones(3), "w", "model/")  # passes
        >>> check_finite(torch.tensor([1.0, float("nan")]), "w", "model/")
        Traceback (most recent call last):
        surgery.errors.CheckpointError: w: 1 non-finite value(s) (NaN/Inf) in model/; ...
    """
    if not all_finite(t):
        raise CheckpointError(f"{escape_name(name, 200)}: {count_non_finite(t)} non-finite value(s) (NaN/Inf) in "
                              f"{escape_name(where)}; fix the checkpoint or exclude this module")


def require_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str, fix: str) -> None:
    """Refuse output tensors holding NaN/Inf, as they would be stored (after any cast).

    Args:
        tensors: (name, tensor) pairs, in the dtype they are written in.
        what: what the tensors are, for the message ("LoRA factors of the adapter").
        fix: what the user can do, for the message.

    Raises:
        ValidationError: "NAME: N non-finite value(s) in WHAT as stored (DTYPE); FIX", naming
        the first tensor that fails.

    Example:
        >>> require_finite([("l.lora_A", torch.ones(2))], "LoRA factors", "use fp32")   # passes
    """
    for name, t in tensors:
        if not all_finite(t):
            dtype = str(t.dtype).removeprefix("torch.")
            raise ValidationError(f"{escape_name(name, 200)}: {count_non_finite(t)} non-finite value(s) in {what} "
                                  f"as stored ({dtype}); {fix}")


# ----------------------------------------------------------------------------- memory


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes ({} where there is none)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_room() -> int | None:
    """What the process's memory cgroup still allows (v2, then v1), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 says "no limit" with ~2^63
            return max(0, limit - usage)
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate, as well as the system tells: MemAvailable plus
    free swap (/proc/meminfo), capped by the memory cgroup's room; the physical memory where
    there is no /proc (os.sysconf); None when nothing is known.

    Example:
        >>> available_memory() > 0
        True
    """
    info = _meminfo()
    room = None
    if "MemAvailable" in info:
        room = info["MemAvailable"] + info.get("SwapFree", 0)
    else:
        try:
            room = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            room = None
    cgroup = _cgroup_room()
    if cgroup is not None:
        room = cgroup if room is None else min(room, cgroup)
    return room


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(nbytes: int, what: str, fix: str = "use a machine with more memory, or exclude it") -> None:
    """Refuse work that needs more memory than is available, before allocating it.

    torch reports a failed allocation as a RuntimeError (not MemoryError), after the output
    directory was started; this says it in one line first. The estimate callers pass is a
    lower bound of what the step holds at once (a tensor as read, its fp32 copy, the SVD's
    factors), so only work that cannot fit is refused.

    Args:
        nbytes: bytes the step needs at once.
        what: what needs them, named for the message (escape names first).
        fix: what the user can do.

    Raises:
        ResourceError: "WHAT needs X GiB of memory, but only Y GiB is available; FIX".

    Example:
        >>> check_fits(1024, "a tiny tensor")          # passes
        >>> check_fits(2**60, "l.weight (fp32 copy)")
        Traceback (most recent call last):
        surgery.errors.ResourceError: l.weight (fp32 copy) needs 1073741824.0 GiB of memory, ...
    """
    room = available_memory()
    if room is not None and nbytes > room:
        raise ResourceError(f"{what} needs {_gib(nbytes)} of memory, but only {_gib(room)} is available; {fix}")


def matrix_bytes(nbytes: int, shape: tuple[int, ...], rank: int | None = None, copies: int = 1) -> int:
    """A lower bound of the memory one matrix step holds: the tensor as read (nbytes),
    `copies` fp32 (m, n) matrices (its upcast, a delta, a residual...) and, with a rank, the
    fp32 factors U (m, k) and Vh (k, n) of its SVD (k = min(rank, m, n)).

    Example:
        >>> matrix_bytes(2 * 64 * 32, (64, 32), rank=8)   # bf16 read + fp32 copy + factors
        15360
    """
    m = int(shape[0]) if shape else 1
    n = 1
    for d in shape[1:]:
        n *= int(d)
    k = min(int(rank), m, n) if rank is not None else 0
    return int(nbytes) + 4 * m * n * copies + 4 * (m + n) * k
