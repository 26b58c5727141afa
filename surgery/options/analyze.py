"""Options of `analyze`: one frozen object, every rule checked once, torch-free.

Rules that need the data (a budget without a BASE, a pattern that matches nothing) stay in
surgery.ops.analyze.
"""

from __future__ import annotations

import dataclasses

from surgery.options.base import Options, non_negative_int, positive_int, require
from surgery.options.common import compute_rules, freeze, seed_rule, selection_rules
from surgery.options.extract import parse_budget

DEFAULT_RANKS = (8, 16, 32, 64)
EXACT_MAX = 1024
RANDOMIZED_CAP = 256


@dataclasses.dataclass(frozen=True)
class AnalyzeOptions(Options):
    """How `analyze` measures the spectra of a model's matrices (and of a delta).

    Attributes:
        ranks: ranks at which the energy kept is reported; stored sorted, without repeats.
        include: only modules matching one of these regexes (re.search); none = all.
        exclude: skip modules matching one of these regexes.
        budget: LoRA parameters to spread over the delta's modules (a count, or a share of the
            model such as "1%"); needs a BASE. None: no recommendation.
        exact_max: exact SVD when min(m, n) <= exact_max, randomized otherwise.
        cap: singular values the randomized SVD computes (at least the largest rank).
        niter: power iterations of the randomized SVD.
        seed: seeds the randomized SVD.
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:N".
        threads: torch CPU threads while analysing; None = torch's current setting.

    Raises:
        OptionError: naming the field, for any value outside its rule.

    Example:
        >>> AnalyzeOptions(ranks=[32, 8, 8]).ranks
        (8, 32)
    """

    ranks: tuple[int, ...] = DEFAULT_RANKS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    budget: str | int | None = None
    exact_max: int = EXACT_MAX
    cap: int = RANDOMIZED_CAP
    niter: int = 4
    seed: int = 0
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        freeze(self, "ranks", "include", "exclude")
        super().__post_init__()
        object.__setattr__(self, "ranks", tuple(sorted(set(self.ranks))))

    def validate(self) -> None:
        require(isinstance(self.ranks, tuple) and len(self.ranks) > 0, "ranks",
                f"give at least one rank, e.g. 8,16,32,64; got {self.ranks!r}")
        for r in self.ranks:
            require(isinstance(r, int) and not isinstance(r, bool) and r >= 1, "ranks",
                    f"must be positive integers, got {r!r}; e.g. 8,16,32,64")
        selection_rules(self.include, self.exclude)
        _budget_rule(self.budget)
        positive_int(self.exact_max, "exact_max")
        positive_int(self.cap, "cap")
        non_negative_int(self.niter, "niter")
        seed_rule(self.seed)
        compute_rules(self.device, self.threads)


def _budget_rule(budget: object) -> None:
    """None, a count >= 0, or a budget string ('2e6', '150000', '1%'); the share is resolved later."""
    if budget is not None:
        parse_budget(budget, syntax_only=True)  # OptionError(field="budget")
