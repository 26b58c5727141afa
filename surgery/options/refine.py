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

#: what the student is trained to match: auto picks logits-kl for causal LMs, pooled otherwise;
#: components may be summed with "+" ("pooled+relational"), weighted by `weights`
OBJECTIVES = ("auto", "pooled", "relational", "hidden", "logits-kl")

#: fewest calibration samples refine accepts (a held-out share needs a few of them)
MIN_SAMPLES = 8

#: a calibration file (one sample per line, or JSONL with "text"), or the samples themselves
Calibration = Union[str, "os.PathLike[str]", tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class RefineOptions(Options):
    """How `refine_adapter` trains an adapter's LoRA factors to imitate a teacher.

    Defaults (steps 1000, lr 3e-3, batch 32) were picked on bench/RESULTS.md §11 (a contrastive
    MiniLM fine-tune where rank-8 SVD keeps 61 % of the retrieval gain): from `--budget r8` they
    keep 96.0–99.4 % over three seeds where 600 steps kept 92.7–95.5 % (the best step was always
    the last); 300 steps at lr 1e-3 and batch 16 plateaued at ≈ 87 %, lr 1e-2 kept 80 %; checked
    on §7 (causal LMs).

    Attributes:
        calibration: unlabeled text: a file path (one sample per line, or JSONL with a "text"
            field) or a list/tuple of samples (stored as a tuple). Required.
        steps: optimizer steps (0 = score only, the adapter is written back unchanged).
        lr: peak AdamW learning rate (0 keeps the adapter as given).
        warmup: linear warm-up steps before the cosine decay; None = steps/10 within [1, 100].
        batch_size: samples per step (and per teacher / held-out batch).
        max_length: tokens per sample; longer samples are truncated.
        objective: one of OBJECTIVES, or components joined by "+" (e.g. "pooled+relational"):
            pooled = 1 - cosine of mean-pooled embeddings; relational = MSE between the in-batch
            cosine-similarity matrices of student and teacher embeddings; hidden = mean over
            `layers` of the per-token normalised MSE of hidden states; logits-kl = KL of the
            next-token distributions (causal LMs).
        weights: one weight per objective component (None = 1 each); the loss is their weighted sum.
        layers: hidden-state indices for "hidden" (0 = embeddings, -1 = last layer);
            None = the middle and the last layer.
        train_vectors: also train the adapter's 1-D deltas (lora_B biases, bias='all' biases,
            modules_to_save vectors such as norms) beside A and B, at a tenth of lr; False (default:
            on the tiny fixtures it made the held-out error worse) keeps them frozen.
        patience: stop after this many held-out evaluations without improvement; None = never.
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
    steps: int = 1000
    lr: float = 3e-3
    warmup: int | None = None
    batch_size: int = 32
    max_length: int = 128
    objective: str = "auto"
    weights: tuple[float, ...] | None = None
    layers: tuple[int, ...] | None = None
    train_vectors: bool = False
    patience: int | None = None
    holdout: float = 0.1
    eval_every: int | None = None
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.calibration, list):  # a frozen object holds a tuple
            object.__setattr__(self, "calibration", tuple(self.calibration))
        for name in ("weights", "layers"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        super().__post_init__()

    def validate(self) -> None:
        _calibration_rule(self.calibration)
        non_negative_int(self.steps, "steps")
        finite_number(self.lr, "lr", lo=0.0)
        non_negative_int(self.warmup, "warmup", allow_none=True)
        positive_int(self.batch_size, "batch_size")
        positive_int(self.max_length, "max_length")
        require(self.max_length >= 2, "max_length", f"must be at least 2 tokens, got {self.max_length}")
        _objective_rule(self.objective, self.weights)
        if self.layers is not None:
            require(isinstance(self.layers, tuple) and len(self.layers) > 0
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in self.layers), "layers",
                    f"must be a non-empty list of hidden-state indices, got {self.layers!r}")
        require(isinstance(self.train_vectors, bool), "train_vectors",
                f"must be true or false, got {self.train_vectors!r}")
        positive_int(self.patience, "patience", allow_none=True)
        finite_number(self.holdout, "holdout", lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        positive_int(self.eval_every, "eval_every", allow_none=True)
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed",
                f"must be an integer, got {self.seed!r}")
        positive_int(self.threads, "threads", allow_none=True)
        device_name(self.device, "device", extra=("auto",))
        require(isinstance(self.overwrite, bool), "overwrite", f"must be true or false, got {self.overwrite!r}")

    @property
    def components(self) -> tuple[str, ...]:
        """The objective's components ("auto" stays "auto": the ops resolve it per architecture)."""
        return tuple(self.objective.split("+"))

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


def _objective_rule(objective: Any, weights: Any) -> None:
    require(isinstance(objective, str), "objective", f"must be a string, got {objective!r}")
    parts = objective.split("+")
    if len(parts) == 1:
        one_of(objective, OBJECTIVES, "objective")
    else:
        bad = [p for p in parts if p not in OBJECTIVES[1:]]
        require(not bad and len(set(parts)) == len(parts), "objective",
                f"{objective!r}: components must be distinct ones of {', '.join(OBJECTIVES[1:])} joined by '+'")
    if weights is None:
        return
    require(isinstance(weights, tuple) and len(weights) == len(parts), "weights",
            f"needs one weight per objective component ({len(parts)}), got {weights!r}")
    for w in weights:
        finite_number(w, "weights", lo=0.0)
    require(any(w > 0 for w in weights), "weights", "at least one weight must be positive")


def _calibration_rule(value: Any) -> None:
    require(value is not None, "calibration",
            "is required: a text file (one sample per line, or JSONL with a \"text\" field) or a list of samples")
    if isinstance(value, tuple):
        require(all(isinstance(t, str) for t in value), "calibration", "samples must be strings")
        require(any(t.strip() for t in value), "calibration", "the list of samples is empty; give text samples")
        return
    ok = isinstance(value, os.PathLike) or (isinstance(value, str) and value.strip() != "")
    require(ok, "calibration", f"must be a file path or a list of text samples, got {value!r}")


__all__ = ["MIN_SAMPLES", "OBJECTIVES", "RefineOptions"]
