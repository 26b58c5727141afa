"""Small tensor helpers shared by the commands: checks that stream in blocks so a
check never costs a full-size temporary (a bf16 isfinite upcasts to fp32 first)."""

from __future__ import annotations

import torch

BLOCK = 1 << 20  # elements per block: a few MB of temporaries at most


def all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or ±inf (non-float tensors always are)."""
    if not t.is_floating_point():
        return True
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + BLOCK]).all()) for i in range(0, flat.numel(), BLOCK))


def count_non_finite(t: torch.Tensor) -> int:
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[i : i + BLOCK])).sum()) for i in range(0, flat.numel(), BLOCK))
