"""Options of extract-lora: every rule checked once, here, before any file is read.

Torch-free (the CLI builds this before its heavy imports). Rules that need the checkpoints
(an include pattern that matches no module, a budget percentage of an unknown model size)
stay in `surgery.ops.extract`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from surgery.errors import OptionError
from surgery.options.base import (
    DTYPE_CHOICES,
    Options,
    device_name,
    finite_number,
    non_negative_int,
    one_of,
    positive_int,
    regexes,
    require,
)

SVD_METHODS = ("auto", "exact", "randomized")
EMBEDDING_MODES = ("lora", "rows", "full", "skip")
OTHER_DELTA_MODES = ("full", "skip")
BIAS_MODES = ("auto", "lora", "all", "skip")
#: PEFT's TaskType values (peft.utils.peft_types.TaskType)
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
DEFAULT_RANK = 16  # when no rank policy is given
DEFAULT_MAX_RANK = 256  # rank cap of the energy/budget policies unless svd="exact"
_SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts


@dataclasses.dataclass(frozen=True)
class ExtractOptions(Options):
    """How `extract_lora` turns FT - BASE into a LoRA adapter.

    Rank policy (at most one of rank / energy / budget; none means rank=16):
        rank:      a fixed rank for every module (>= 1).
        energy:    per module, the smallest rank keeping this fraction of ‖Δ‖²_F, in (0, 1].
        budget:    total LoRA parameters over all modules: a count ("2e6", 150000), a share
                   of the model ("1%"), or "rN": as many as rank N on every selected module
                   would take; allocated by largest σ² gained per parameter (per-module ranks,
                   PEFT's rank_pattern).
        max_rank:  cap for every policy (default 256 for energy/budget unless svd="exact").
    SVD: svd ("auto" | "exact" | "randomized"), niter (power iterations, >= 0), seed.
    Selection: include / exclude (regexes searched in module names), embeddings: how a changed
        input embedding is written —
            "lora" (default): LoRA factors; "full": saved whole (modules_to_save); "skip": left out;
            "rows": its most changed rows, whole (PEFT's trainable_token_indices; PEFT >= 0.15):
                    as many as a rank-N LoRA's parameters buy under rank N, the fewest reaching
                    `energy`; under `budget` the share a uniform rank would give the embedding
                    (the allocator spreads the rest).
        other_deltas (norm deltas: "full" saves them whole, "skip"; default
        "full", or "skip" with serving_safe), bias: how bias deltas are written —
            "lora": lora_B.bias (lora_bias: true; PEFT then refuses embedding LoRAs, so changed
                    embeddings are saved whole), "all": the fine-tune's biases with PEFT's
                    bias="all" (they replace the base's on load), "skip": left out (reported),
            "auto" (default): "lora", or "all" when the adapter holds an embedding or expert LoRA
                    (keeps the adapter small); with serving_safe, "skip" in that case.
    serving_safe: no modules_to_save in the adapter (some servers reject it): other_deltas
        "skip" and embeddings never saved whole (tensors whose vocabulary grew still are, with
        a note).
    Output: dtype (adapter dtype "fp32" | "fp16" | "bf16"; default the base's), task_type (a
        PEFT TaskType; None: inferred from config.json's architectures, null when unknown),
        overwrite.
    Inputs: revision (a Hugging Face Hub revision for BASE / FT given as Hub ids; cache only).
    Compute: device ("auto" | "cpu" | "cuda" | "cuda:N"), threads (torch CPU threads).

    Raises OptionError(field=...) for any value or combination that cannot work.

    Example:
        >>> ExtractOptions(energy=0.9, max_rank=64).rank_policy
        'energy'
        >>> ExtractOptions(rank=4, energy=0.9)
        Traceback (most recent call last):
        ...
        surgery.errors.OptionError: energy: cannot be combined with rank; give only one of rank, energy, budget
    """

    rank: int | None = None
    energy: float | None = None
    budget: str | int | None = None
    max_rank: int | None = None
    svd: str = "auto"
    niter: int = 4
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    embeddings: str = "lora"
    other_deltas: str | None = None
    bias: str = "auto"
    serving_safe: bool = False
    dtype: str | None = None
    device: str = "auto"
    threads: int | None = None
    task_type: str | None = None
    overwrite: bool = False
    revision: str | None = None

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):  # a list (or one pattern) is accepted; stored as a tuple
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        super().__post_init__()

    def validate(self) -> None:
        self._validate_policy()
        one_of(self.svd, SVD_METHODS, "svd")
        non_negative_int(self.niter, "niter")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool)
                and _SEED_RANGE[0] <= self.seed < _SEED_RANGE[1], "seed", f"must be an integer, got {self.seed!r}")
        for name in ("include", "exclude"):
            require(isinstance(getattr(self, name), tuple), name,
                    f"must be a list of regular expressions, got {getattr(self, name)!r}")
            regexes(getattr(self, name), name)
        one_of(self.embeddings, EMBEDDING_MODES, "embeddings")
        one_of(self.other_deltas, OTHER_DELTA_MODES, "other_deltas", allow_none=True)
        one_of(self.bias, BIAS_MODES, "bias")
        for name in ("serving_safe", "overwrite"):
            require(isinstance(getattr(self, name), bool), name, f"must be True or False, got {getattr(self, name)!r}")
        if self.serving_safe:
            require(self.embeddings != "rows", "serving_safe",
                    "writes plain LoRA only, so it cannot be combined with embeddings='rows' (trainable tokens)")
            require(self.embeddings != "full", "serving_safe",
                    "saves nothing whole (no modules_to_save), so it cannot be combined with embeddings='full'")
            require(self.other_deltas != "full", "serving_safe",
                    "saves nothing whole (no modules_to_save), so it cannot be combined with other_deltas='full'")
        one_of(self.dtype, DTYPE_CHOICES, "dtype", allow_none=True)
        device_name(self.device, "device", extra=("auto",))
        positive_int(self.threads, "threads", allow_none=True)
        one_of(self.task_type, TASK_TYPES, "task_type", allow_none=True)
        require(self.revision is None or (isinstance(self.revision, str) and self.revision.strip() != ""
                                          and "\n" not in self.revision), "revision",
                f"must be a branch, tag or commit of the Hub repository, got {self.revision!r}")

    def _validate_policy(self) -> None:
        given = [n for n in ("rank", "energy", "budget") if getattr(self, n) is not None]
        if len(given) > 1:
            raise OptionError(f"{given[1]}: cannot be combined with {given[0]}; give only one of rank, energy, budget",
                              field=given[1])
        positive_int(self.rank, "rank", allow_none=True)
        finite_number(self.energy, "energy", lo=0.0, hi=1.0, lo_open=True, allow_none=True)
        if self.budget is not None:
            parse_budget(self.budget, None, syntax_only=True)
        positive_int(self.max_rank, "max_rank", allow_none=True)

    # ------------------------------------------------------------------ derived values

    @property
    def rank_policy(self) -> str:
        """'rank' | 'energy' | 'budget': the policy in force (rank when none is given)."""
        return "energy" if self.energy is not None else "budget" if self.budget is not None else "rank"

    @property
    def effective_rank(self) -> int | None:
        """The fixed rank: `rank`, DEFAULT_RANK when no policy is given, None under energy/budget."""
        return self.rank if self.rank is not None else DEFAULT_RANK if self.rank_policy == "rank" else None

    @property
    def effective_other_deltas(self) -> str:
        """`other_deltas`, defaulting to 'skip' with serving_safe and 'full' otherwise."""
        return self.other_deltas or ("skip" if self.serving_safe else "full")

    @property
    def rank_cap(self) -> int | None:
        """The most singular triplets any module computes (None: all of them)."""
        if self.effective_rank is not None:
            return self.effective_rank if self.max_rank is None else min(self.effective_rank, self.max_rank)
        if self.max_rank is None and self.svd != "exact":
            return DEFAULT_MAX_RANK
        return self.max_rank


# ----------------------------------------------------------------------------- budget syntax

_NUMBER = re.compile(r"^[0-9][0-9_]*(\.[0-9_]*)?([eE][+-]?[0-9]+)?$")


def _budget_error(message: str) -> OptionError:
    return OptionError(message, field="budget")


def budget_rank(text: Any) -> int | None:
    """N for a rank budget "rN" (as many LoRA parameters as rank N on every selected module), else None.

    Raises:
        OptionError(field="budget"): "r0" or a rank that is not a whole number.

    Example:
        >>> budget_rank("r8"), budget_rank("1e6")
        (8, None)
    """
    if not isinstance(text, str) or not re.fullmatch(r"[rR]\S*", text.strip()):
        return None
    m = re.fullmatch(r"[rR]([0-9]+)", text.strip())
    if m is None or int(m.group(1)) < 1:
        raise _budget_error(f"budget: {text!r} is not a rank budget like 'r8' (a rank >= 1)")
    return int(m.group(1))


def parse_budget(text: Any, model_params: int | None = None, *, syntax_only: bool = False) -> int:
    """A parameter budget: "150000", "1e6", "1_000_000" (or an int) or "2%" of model_params.
    ("rN", a rank budget, is resolved by the extraction plan: see budget_rank.)

    Counts must be whole non-negative numbers; percentages must be in (0, 100] and are rounded
    down. Torch-free. With syntax_only, a percentage needs no model_params (returns 0).

    Args:
        text: the budget as given.
        model_params: the model's parameter count (needed for a percentage).
        syntax_only: only check the syntax.
    Returns:
        the number of parameters.
    Raises:
        OptionError(field="budget") naming the bad string.

    Example:
        >>> parse_budget("2%", 1_000_000), parse_budget("1e6")
        (20000, 1000000)
    """
    if budget_rank(text) is not None:  # "r8": resolved against the module shapes by the extraction plan
        if syntax_only:
            return 0
        raise _budget_error(f"budget: {text!r} is a rank budget; it needs the model's module shapes")
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise _budget_error(f"budget: must be >= 0 parameters, got {text}")
        return text
    if not isinstance(text, str):
        raise _budget_error(f"budget: must be a count like '1e6' or a percentage like '2%', got {text!r}")
    s = text.strip()
    if s.endswith("%"):
        num = s[:-1].strip()
        if not _NUMBER.match(num):
            raise _budget_error(f"budget: {text!r} is not a percentage like '2%' or a count like '1e6'")
        pct = float(num)
        if not 0.0 < pct <= 100.0:
            raise _budget_error(f"budget: a percentage must be in (0, 100], got {text!r}")
        if syntax_only:
            return 0
        if isinstance(model_params, bool) or not isinstance(model_params, int) or model_params <= 0:
            raise _budget_error(f"budget: {text!r} is a percentage but the model parameter count is unknown")
        return int(math.floor(model_params * pct / 100.0))
    if not _NUMBER.match(s):
        raise _budget_error(f"budget: {text!r} is not a count like '150000' / '1e6' or a percentage like '2%'")
    if re.fullmatch(r"[0-9][0-9_]*", s):
        return int(s)  # exact for large counts (float would round)
    value = float(s)
    if not math.isfinite(value) or value != math.floor(value):
        raise _budget_error(f"budget: {text!r} is not a whole number of parameters")
    return int(value)


__all__ = ["ExtractOptions", "budget_rank", "parse_budget", "SVD_METHODS", "EMBEDDING_MODES", "OTHER_DELTA_MODES",
           "BIAS_MODES", "TASK_TYPES", "DEFAULT_RANK", "DEFAULT_MAX_RANK"]
