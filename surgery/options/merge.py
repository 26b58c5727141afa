"""Options of `merge` / unmerge (surgery.ops.merge.merge, `surgery merge`).

Torch-free: the CLI builds these before any heavy import. Every rule that needs only the
values lives in `validate()`; the one rule that needs the adapter list (one weight per
adapter) is `check_adapters`, which `merge` calls and `for_adapters` runs at construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from surgery.errors import OptionError
from surgery.options.base import DTYPE_CHOICES, Options, device_name, finite_number, one_of, positive_int, size

# torch dtypes by their str(), so a torch.dtype is accepted without importing torch here
_TORCH_DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


@dataclasses.dataclass(frozen=True)
class MergeOptions(Options):
    """How adapters are folded into (or out of) a base checkpoint.

    Fields:
        weights: one finite number per adapter, in order; empty (or None) = 1.0 each.
            Stored as a tuple of floats.
        unmerge: subtract the adapters' deltas instead of adding them.
        dtype: "fp32" | "fp16" | "bf16" (or the torch dtype) for every floating tensor written;
            None keeps each tensor's own dtype. Stored as the short name.
        shard_size: the largest output shard, bytes or a size string ("5GB", "500MiB"); None =
            the base's largest shard (the shard count is kept). Stored as an int.
        device: "auto" | "cpu" | "cuda" | "cuda:N", where the deltas are computed ("auto" = cuda
            when available). Availability is checked when the merge runs.
        threads: CPU threads for torch during the merge; None = torch's own choice.
        overwrite: replace an existing output directory.

    Raises:
        OptionError(field=...) naming the first field that breaks a rule.

    Example:
        >>> MergeOptions(weights=[0.7, 0.3], dtype="bf16", shard_size="5GB").shard_size
        5000000000
    """

    weights: Sequence[float] | None = ()   # stored as a tuple of floats
    unmerge: bool = False
    dtype: str | None = None               # a torch dtype is accepted too; stored as its short name
    shard_size: int | str | None = None    # stored as bytes (int)
    device: str = "auto"
    threads: int | None = None
    overwrite: bool = False

    def validate(self) -> None:
        self._normalize("weights", _weights(self.weights))
        if not isinstance(self.dtype, str) and self.dtype is not None:
            self._normalize("dtype", _TORCH_DTYPE_NAMES.get(str(self.dtype), self.dtype))
        one_of(self.dtype, DTYPE_CHOICES, "dtype", allow_none=True)
        self._normalize("shard_size", size(self.shard_size, "shard_size"))
        device_name(self.device, "device", extra=("auto",))
        positive_int(self.threads, "threads", allow_none=True)
        for name in ("unmerge", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name}: must be true or false, got {getattr(self, name)!r}", field=name)

    def _normalize(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen: set once, while validating

    def weight_list(self, n_adapters: int) -> list[float]:
        """The weight of each of `n_adapters` adapters (1.0 each when none were given).

        Raises OptionError(field="weights") when the count does not match (see check_adapters)."""
        self.check_adapters(n_adapters)
        return list(self.weights) if self.weights else [1.0] * n_adapters

    def check_adapters(self, n_adapters: int) -> None:
        """The rules that need the number of adapters: at least one, and one weight per adapter
        (or none). Raises OptionError(field="adapters" / "weights")."""
        if n_adapters < 1:
            raise OptionError("adapters: none given; pass at least one adapter directory", field="adapters")
        if self.weights and len(self.weights) != n_adapters:
            raise OptionError(f"weights: {len(self.weights)} weight(s) for {n_adapters} adapter(s); "
                              f"give one weight per adapter or none", field="weights")

    @classmethod
    def for_adapters(cls, adapters: Sequence[Any], **fields: Any) -> MergeOptions:
        """Build the options and check them against the adapter list at once (the CLI's path:
        a weight count that does not match is then a usage error).

        >>> MergeOptions.for_adapters(["a", "b"], weights=[1, 2]).weights
        (1.0, 2.0)
        """
        opts = cls(**fields)
        opts.check_adapters(len(adapters))
        return opts


def _weights(value: Any) -> tuple[float, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise OptionError(f"weights: must be a list of finite numbers, got {value!r}", field="weights")
    for w in value:
        finite_number(w, "weights")
    return tuple(float(w) for w in value)


__all__ = ["MergeOptions"]
