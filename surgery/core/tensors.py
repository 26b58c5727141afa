"""Small tensor helpers shared by the commands: checks that stream in blocks so a
check never costs a full-size temporary (a bf16 isfinite upcasts to fp32 first)."""

from __future__ import annotations

import torch

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
        if not bool(torch.isfinite(block.sum(dtype=torch.float32))) and not bool(torch.isfinite(_checkable(block)).all()):
            return False
    return True


def count_non_finite(t: torch.Tensor) -> int:
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(_checkable(flat[i : i + BLOCK]))).sum()) for i in range(0, flat.numel(), BLOCK))


def _checkable(block: torch.Tensor) -> torch.Tensor:
    """isfinite has no float8 kernels: upcast 1-byte floats (a block at a time)."""
    return block.float() if block.element_size() == 1 else block
