"""Options of `factorize`: one frozen object, every rule checked once, torch-free.

Rules that need the data (no layer reaching min_savings, a pattern that matches nothing) stay
in surgery.ops.factorize.
"""

from __future__ import annotations

import dataclasses

from surgery.options.base import Options, finite_number, non_negative_int, positive_int, require
from surgery.options.common import compute_rules, flag, freeze, seed_rule, selection_rules, shard_size_rule


@dataclasses.dataclass(frozen=True)
class FactorizeOptions(Options):
    """How `factorize` replaces Linear / Conv1D weights by low-rank factors.

    Attributes:
        rank: rank of every factorised layer (exactly one of rank and energy).
        energy: the smallest rank keeping this share of ‖W‖²_F, in (0, 1].
        include: only modules matching one of these regexes; none = every Linear / Conv1D.
        exclude: skip modules matching one of these regexes.
        min_savings: factorise a layer only where r·(out+in) saves at least this share of
            out·in, in [0, 1).
        max_rank: rank cap for `energy` on layers large enough for the randomized SVD.
        niter: power iterations of the randomized SVD.
        seed: seeds the randomized SVD.
        shard_size: output shard size limit (bytes or '5GB').
        evaluate: load both models afterwards and compare their last hidden states.
        overwrite: replace an existing output directory.
        device: "auto" (cuda when available), "cpu", "cuda" or "cuda:N" (the SVDs).
        threads: torch CPU threads while computing; None = torch's current setting.

    Raises:
        OptionError: naming the field, for any value outside its rule (rank and energy
            together, or neither, names "rank").

    Example:
        >>> FactorizeOptions(energy=0.9).policy
        'energy'
    """

    rank: int | None = None
    energy: float | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_savings: float = 0.2
    max_rank: int = 256
    niter: int = 4
    seed: int = 0
    shard_size: str | int = "5GB"
    evaluate: bool = True
    overwrite: bool = False
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        freeze(self, "include", "exclude")
        super().__post_init__()

    def validate(self) -> None:
        require((self.rank is None) != (self.energy is None), "rank", "give exactly one of rank and energy")
        positive_int(self.rank, "rank", allow_none=True)
        finite_number(self.energy, "energy", lo=0, hi=1, lo_open=True, allow_none=True)
        selection_rules(self.include, self.exclude)
        finite_number(self.min_savings, "min_savings", lo=0, hi=1, hi_open=True)
        positive_int(self.max_rank, "max_rank")
        non_negative_int(self.niter, "niter")
        seed_rule(self.seed)
        shard_size_rule(self.shard_size, allow_none=False)
        flag(self.evaluate, "evaluate")
        flag(self.overwrite, "overwrite")
        compute_rules(self.device, self.threads)

    @property
    def policy(self) -> str:
        """"rank" (fixed rank) or "energy" (smallest rank keeping `energy`)."""
        return "rank" if self.rank is not None else "energy"
