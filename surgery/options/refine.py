"""Options of `refine` (and of `extract-lora --refine`): one frozen object, every rule checked once.

Torch-free: the CLI builds it from its flags before any heavy import. Rules that need the data
(too few calibration samples for the hold-out, an objective the architecture cannot use) stay in
surgery.ops.refine.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Union

from surgery.options.base import (
    Options,
    device_name,
    finite_number,
    non_negative_int,
    one_of,
    positive_int,
    require,
)

#: what the student is trained to match: auto picks logits-kl for causal LMs, pooled otherwise
OBJECTIVES = ("auto", "pooled", "hidden", "logits-kl")

#: a calibration file (one sample per line, or JSONL with "text"), or the samples themselves
Calibration = Union[str, "os.PathLike[str]", tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class RefineOptions(Options):
    """How `refine_adapter` trains an adapter's LoRA factors to imitate a teacher.

    Attributes:
        calibration: unlabeled text: a file path (one sample per line, or JSONL with a "text"
            field) or a list/tuple of samples (stored as a tuple). Required.
        steps: optimizer steps (0 = score only, the adapter is written back unchanged).
        lr: peak AdamW learning rate (0 keeps the adapter as given).
        warmup: linear warm-up steps before the cosine decay; None = steps/10 within [1, 100].
        batch_size: samples per step (and per teacher / held-out batch).
        max_length: tokens per sample; longer samples are truncated.
        objective: one of OBJECTIVES.
        holdout: share of the samples held out to score checkpoints, in (0, 1).
        eval_every: held-out scoring interval in steps; None = steps/10 (at least 1).
        seed: seeds the split, the batch order and torch; same inputs + seed + threads = same bytes.
        threads: torch CPU threads while refining; None = torch's current setting.
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:N".
        overwrite: replace an existing output directory.

    Raises:
        OptionError: naming the field, for any value outside its rule (nan, inf, negative...).

    Example:
        >>> RefineOptions(calibration="texts.txt", steps=100).eval_interval
        10
    """

    calibration: Calibration | None = None
    steps: int = 300
    lr: float = 1e-3
    warmup: int | None = None
    batch_size: int = 16
    max_length: int = 128
    objective: str = "auto"
    holdout: float = 0.1
    eval_every: int | None = None
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.calibration, list):  # a frozen object holds a tuple
            object.__setattr__(self, "calibration", tuple(self.calibration))
        super().__post_init__()

    def validate(self) -> None:
        _calibration_rule(self.calibration)
        non_negative_int(self.steps, "steps")
        finite_number(self.lr, "lr", lo=0.0)
        non_negative_int(self.warmup, "warmup", allow_none=True)
        positive_int(self.batch_size, "batch_size")
        positive_int(self.max_length, "max_length")
        require(self.max_length >= 2, "max_length", f"must be at least 2 tokens, got {self.max_length}")
        one_of(self.objective, OBJECTIVES, "objective")
        finite_number(self.holdout, "holdout", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        positive_int(self.eval_every, "eval_every", allow_none=True)
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed",
                f"must be an integer, got {self.seed!r}")
        positive_int(self.threads, "threads", allow_none=True)
        device_name(self.device, "device", extra=("auto",))
        require(isinstance(self.overwrite, bool), "overwrite", f"must be true or false, got {self.overwrite!r}")

    @property
    def eval_interval(self) -> int:
        """Steps between held-out scorings: eval_every, or steps/10 (at least 1)."""
        return self.eval_every or max(1, self.steps // 10)

    @property
    def warmup_steps(self) -> int:
        """Linear warm-up steps: warmup, or steps/10 clamped to [1, 100]."""
        return self.warmup if self.warmup is not None else max(1, min(100, self.steps // 10))

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        if isinstance(self.calibration, tuple):  # the samples themselves do not belong in a report
            d["calibration"] = f"({len(self.calibration)} samples)"
        return d


def _calibration_rule(value: Any) -> None:
    require(value is not None, "calibration",
            "is required: a text file (one sample per line, or JSONL with a \"text\" field) or a list of samples")
    if isinstance(value, tuple):
        require(all(isinstance(t, str) for t in value), "calibration", "samples must be strings")
        require(any(t.strip() for t in value), "calibration", "the list of samples is empty; give text samples")
        return
    ok = isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip() != "")
    require(ok, "calibration", f"must be a file path or a list of text samples, got {value!r}")


__all__ = ["OBJECTIVES", "RefineOptions"]
