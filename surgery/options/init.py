"""Options of `init-lora` and `init-adapter`: frozen objects, every rule checked once, torch-free.

Rules that need the data (a rank larger than a matrix, a pattern that selects nothing) stay in
surgery.ops.init_lora and surgery.ops.bottleneck.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Union, cast

from surgery.options.base import (
    DTYPE_CHOICES,
    Options,
    finite_number,
    non_negative_int,
    one_of,
    positive_int,
    regex,
    require,
)
from surgery.options.common import compute_rules, flag, freeze, seed_rule, selection_rules, shard_size_rule

#: how init-lora initialises the factors (see surgery.ops.init_lora)
INIT_METHODS = ("pissa", "milora", "olora")
#: the SVD engine's methods (surgery.core.lowrank.METHODS)
SVD_METHODS = ("auto", "exact", "randomized")
#: where init-adapter puts its bottlenecks
PLACEMENTS = ("ffn", "attn", "both")
#: the bottleneck's non-linearity (surgery.ops.bottleneck.ACTIVATIONS)
ACTIVATION_NAMES = ("gelu", "relu", "tanh", "silu", "identity")

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass(frozen=True)
class InitLoraOptions(Options):
    """How `init_lora` initialises LoRA factors from a model's own weights.

    Attributes:
        rank: LoRA rank r (required).
        method: "pissa" (top-r singular triplets), "milora" (bottom-r), "olora" (QR).
        alpha: lora_alpha; None = the rank (scale alpha / r = 1).
        niter: power iterations of the randomized SVD (pissa).
        svd: SVD engine for pissa: "auto", "exact" or "randomized".
        oversample: extra range-finder columns; None = max(10, r // 4).
        include: only modules matching one of these regexes; none = every Linear / Conv1D.
        exclude: skip modules matching one of these regexes.
        seed: seeds the randomized SVD.
        adapter_dtype: dtype of the LoRA factors: "fp32", "fp16" or "bf16" (the residual keeps
            the model's dtype).
        shard_size: residual shard size limit (bytes or '5GB'); None = the input's largest shard.
        overwrite: replace an existing output directory.
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:N".
        threads: torch CPU threads while computing; None = torch's current setting.

    Raises:
        OptionError: naming the field, for any value outside its rule.

    Example:
        >>> InitLoraOptions(rank=8, alpha=16).scaling
        2.0
    """

    rank: int | None = None
    method: str = "pissa"
    alpha: float | None = None
    niter: int = 4
    svd: str = "auto"
    oversample: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    seed: int = 0
    adapter_dtype: str = "fp32"
    shard_size: str | int | None = None
    overwrite: bool = False
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        freeze(self, "include", "exclude")
        super().__post_init__()

    def validate(self) -> None:
        positive_int(self.rank, "rank")
        one_of(self.method, INIT_METHODS, "method")
        finite_number(self.alpha, "alpha", lo=0, lo_open=True, allow_none=True)
        non_negative_int(self.niter, "niter")
        one_of(self.svd, SVD_METHODS, "svd")
        non_negative_int(self.oversample, "oversample", allow_none=True)
        selection_rules(self.include, self.exclude)
        seed_rule(self.seed)
        one_of(self.adapter_dtype, DTYPE_CHOICES, "adapter_dtype")
        shard_size_rule(self.shard_size)
        flag(self.overwrite, "overwrite")
        compute_rules(self.device, self.threads)

    @property
    def lora_alpha(self) -> float:
        """alpha as written to adapter_config.json: the rank when not given."""
        return float(cast(int, self.rank) if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        """The LoRA scale alpha / r."""
        return self.lora_alpha / cast(int, self.rank)


@dataclasses.dataclass(frozen=True)
class InitAdapterOptions(Options):
    """How `init_adapter` places and initialises bottleneck adapters.

    Attributes:
        bottleneck: bottleneck width R (required).
        placement: after the FFN output projection ("ffn"), the attention output projection
            ("attn"), or both; ignored when `modules` is given.
        modules: a regex naming the output projections instead of `placement`.
        from_delta: (BASE, FT) checkpoints: initialise from the fine-tune's delta instead of
            the projection's own singular vectors.
        activation: the bottleneck's non-linearity (one of ACTIVATION_NAMES).
        include: only modules matching one of these regexes.
        exclude: skip modules matching one of these regexes.
        overwrite: replace an existing output directory.
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:N".
        threads: torch CPU threads while computing; None = torch's current setting.

    Raises:
        OptionError: naming the field, for any value outside its rule.

    Example:
        >>> InitAdapterOptions(bottleneck=16, placement="both").init
        'svd'
    """

    bottleneck: int | None = None
    placement: str = "ffn"
    modules: str | None = None
    from_delta: tuple[PathLike, PathLike] | None = None
    activation: str = "gelu"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overwrite: bool = False
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        freeze(self, "include", "exclude", "from_delta")
        super().__post_init__()

    def validate(self) -> None:
        positive_int(self.bottleneck, "bottleneck")
        one_of(self.placement, PLACEMENTS, "placement")
        regex(self.modules, "modules")
        require(self.from_delta is None or (isinstance(self.from_delta, tuple) and len(self.from_delta) == 2),
                "from_delta", f"must be two checkpoints (BASE, FT), got {self.from_delta!r}")
        one_of(self.activation, ACTIVATION_NAMES, "activation")
        selection_rules(self.include, self.exclude)
        flag(self.overwrite, "overwrite")
        compute_rules(self.device, self.threads)

    @property
    def init(self) -> str:
        """"delta" with from_delta, else "svd"."""
        return "delta" if self.from_delta else "svd"
