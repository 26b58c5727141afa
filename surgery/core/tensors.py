"""Small tensor helpers shared by the commands: checks that stream in blocks so a
check never costs a full-size temporary (a bf16 isfinite upcasts to fp32 first)."""

from __future__ import annotations

from pathlib import Path

import torch

from surgery.errors import CheckpointError

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
        raise CheckpointError(f"{name}: {count_non_finite(t)} non-finite value(s) (NaN/Inf) in {where}; "
                              "fix the checkpoint or exclude this module")
