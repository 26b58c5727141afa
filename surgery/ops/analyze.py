"""analyze: the spectra of a model's matrices, and of the delta between two models.

What a user reads before choosing ``--rank``. For every matrix-shaped weight
(Linear, Conv1D, Embedding; oriented (out, in), which changes no singular value):

- shape and Frobenius norm ‖W‖_F;
- stable rank  ‖W‖²_F / σ₁²  (exact: σ₁ is always among the computed values);
- effective rank (Roy & Vetterli, 2007): exp(H(p)) with p_i = σ_i / Σ_j σ_j and
  H the Shannon entropy (natural log). 1 for a rank-1 matrix, min(m, n) for a
  flat spectrum;
- energy kept at each requested rank r: Σ_{i≤r} σ_i² / ‖W‖²_F.

With a BASE, the same for the delta Δ = MODEL − BASE, plus the relative change
‖Δ‖_F / ‖W_base‖_F, the smallest rank keeping 90 / 95 / 99 % of ‖Δ‖²_F, and (with
a parameter budget) the rank per module chosen by the allocator extract-lora uses.

SVD policy (stated in every result as ``method_note``): exact when
min(m, n) ≤ ``exact_max`` (default 1024), else randomized top-k with
k = max(``cap``, largest requested rank) (default cap 256). For randomized layers
energies and stable rank are still exact (measured against the full ‖W‖²_F), the
90/95/99 % ranks are exact when reached within k (else reported as "> k"), but the
effective rank is computed from the top-k values only (``spectrum_complete`` is
false; the CLI marks it with "~").

Streaming: one tensor (pair) at a time in shard order; only the singular values
are kept (at most k floats per module).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from surgery.core.hf import resolve_device, torch_threads
from surgery.core.layers import check_includes_match, matrix_tensors, module_filter, module_of, open_model, oriented
from surgery.core.lowrank import SVDResult, allocate_budget, parse_budget, rank_budget_params, truncated_svd
from surgery.core.tensors import check_finite, check_fits, matrix_bytes
from surgery.errors import CheckpointError, OptionError
from surgery.io import CheckpointIndex, LazyReader, escape_name
from surgery.options.analyze import DEFAULT_RANKS, EXACT_MAX, RANDOMIZED_CAP, AnalyzeOptions
from surgery.options.extract import budget_rank

__all__ = ["AnalyzeOptions", "AnalyzeResult", "ModuleAnalysis", "SpectrumStats", "analyze", "effective_rank",
           "spectrum", "spectrum_stats", "layer_type", "check_plot_path", "plot_spectra", "DEFAULT_RANKS"]

Progress = Callable[[str, int, int], None]

DELTA_ENERGIES = (0.90, 0.95, 0.99)


# ----------------------------------------------------------------------------- spectra


@dataclass
class SpectrumStats:
    shape: tuple[int, int]
    norm: float  # ‖M‖_F
    stable_rank: float  # ‖M‖²_F / σ₁²
    effective_rank: float  # exp(entropy of σ / Σσ), over the computed values
    energy: dict[int, float]  # requested rank -> fraction of ‖M‖²_F kept
    method: str  # "exact" | "randomized"
    k: int  # singular values computed
    spectrum_complete: bool  # all min(m, n) values computed (effective rank exact)
    singular_values: list[float] = field(repr=False, default_factory=list)
    rank_for_energy: dict[str, int | None] = field(default_factory=dict)  # "0.9" -> r, None = beyond k


def effective_rank(S: Tensor) -> float:
    """Roy & Vetterli: exp(−Σ p_i log p_i), p_i = σ_i / Σσ (0 for a zero spectrum)."""
    s = S.double().clamp_min(0)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def spectrum(M: Tensor, *, exact_max: int = EXACT_MAX, cap: int = RANDOMIZED_CAP, niter: int = 4,
             seed: int = 0, name: str | None = None, device: str | torch.device = "cpu") -> SVDResult:
    """The SVD analyze uses: exact for min(m, n) ≤ exact_max, else randomized top-cap.

    Args:
        M: an (m, n) matrix (any real dtype; computed in fp32).
        exact_max, cap, niter, seed: the policy (see the module docstring).
        name: the tensor's name, for messages.
        device: where the SVD runs (results are CPU fp32).

    Example:
        >>> spectrum(torch.randn(2048, 2048), cap=64).method
        'randomized'
    """
    mn = min(M.shape)
    if mn <= exact_max:
        return truncated_svd(M, None, method="exact", name=name, device=device)
    return truncated_svd(M, min(cap, mn), method="randomized", niter=niter, seed=seed, name=name, device=device)


def spectrum_stats(res: SVDResult, ranks: Sequence[int], energies: Sequence[float] = ()) -> SpectrumStats:
    m, n = res.shape
    mn = min(m, n)
    total = res.total_energy
    s1 = float(res.S[0]) if res.k else 0.0
    energy = {}
    for r in ranks:
        rr = min(r, res.k) if res.k else 0
        # beyond the computed k only when the spectrum is complete (then k == rank): everything is kept
        energy[int(r)] = res.energy_kept(rr) if r <= res.k or res.k >= mn or total == 0 else float("nan")
    rfe: dict[str, int | None] = {}
    for e in energies:
        r = res.rank_for_energy(e)
        rfe[f"{e:g}"] = r if res.energy_kept(r) >= e else None
    return SpectrumStats(
        shape=(m, n),
        norm=math.sqrt(total),
        stable_rank=total / (s1 * s1) if s1 > 0 else 0.0,
        effective_rank=effective_rank(res.S),
        energy=energy,
        method=res.method,
        k=res.k,
        spectrum_complete=res.k >= mn or total == 0.0,
        singular_values=[float(x) for x in res.S],
        rank_for_energy=rfe,
    )


# ----------------------------------------------------------------------------- analyze


@dataclass
class ModuleAnalysis:
    module: str
    tensor: str
    kind: str
    weight: SpectrumStats
    delta: SpectrumStats | None = None
    rel_change: float | None = None  # ‖Δ‖_F / ‖W_base‖_F
    recommended_rank: int | None = None  # from --budget


@dataclass
class AnalyzeResult:
    model: str
    base: str | None
    ranks: list[int]
    modules: list[ModuleAnalysis]
    method_note: str
    effective_rank_definition: str
    budget: int | None = None
    budget_used: int | None = None
    model_params: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


EFFECTIVE_RANK_DEF = "Roy & Vetterli (2007): exp(H(p)), p_i = s_i / sum_j s_j, H the Shannon entropy (natural log)"


def method_note(exact_max: int, cap: int, niter: int) -> str:
    return (
        f"SVD: exact when min(m, n) <= {exact_max}; otherwise randomized top-k (k = max({cap}, largest --ranks), "
        f"{niter} power iterations). For randomized layers energies, stable rank and the 90/95/99% ranks are exact "
        "(measured against the full squared Frobenius norm; a rank beyond k shows as '>k'), the effective rank "
        "uses the top-k singular values only (marked '~')."
    )


@dataclass
class _Plan:
    """What analyze settles from headers alone, before reading any tensor."""

    idx: CheckpointIndex
    bidx: CheckpointIndex | None
    selected: dict[str, str]  # tensor -> kind, the matrices to analyse
    budget: int | None  # parameters, resolved against the model's size
    k_cap: int  # singular values the randomized SVD computes
    device: torch.device
    skipped: list[dict] = field(default_factory=list)  # selected but not analysable (an empty matrix), with why


def analyze(
    model: str | Path,
    base: str | Path | None = None,
    options: AnalyzeOptions | None = None,
    *,
    progress: Progress | None = None,
    **fields,
) -> AnalyzeResult:
    """Spectral statistics of MODEL's matrices (and of MODEL − BASE). See the module docstring.

    Args:
        model: the model checkpoint (file or directory).
        base: a base checkpoint of the same architecture: also analyse the delta MODEL − BASE.
        options: an AnalyzeOptions; None builds one from FIELDS (ranks=..., include=..., ...).
        progress: called as progress("analyze", done, total) after each matrix.
        **fields: AnalyzeOptions fields, replacing those of `options`.

    Returns:
        An AnalyzeResult: one ModuleAnalysis per matrix, in file order.

    Raises:
        OptionError: a bad option (naming its field), a budget without a base, a pattern
            that matches nothing, nothing selected.
        CheckpointError: unreadable input, an adapter directory, MODEL and BASE differing,
            NaN/Inf in a matrix.

    Example:
        >>> res = analyze("ft/", "base/", ranks=[4, 8], budget="1%")
        >>> {m.module: m.recommended_rank for m in res.modules}
    """
    t0 = time.perf_counter()
    opts = AnalyzeOptions.build(options, **fields)
    plan = _plan(model, base, opts)
    with torch_threads(opts.threads):
        rows, delta_spectra = _analyze_all(plan, opts, model, base, progress)
    budget = plan.budget
    if opts.budget is not None and (n := budget_rank(opts.budget)) is not None:
        budget = rank_budget_params([(m, k, 1) for S, m, k in delta_spectra.values()
                                     if S.numel() and float(S[0]) > 0], n)  # changed modules, as extract counts
    used = _recommend(rows, delta_spectra, budget) if budget is not None else None
    return AnalyzeResult(
        model=str(model), base=None if base is None else str(base), ranks=list(opts.ranks), modules=rows,
        method_note=method_note(opts.exact_max, plan.k_cap, opts.niter), effective_rank_definition=EFFECTIVE_RANK_DEF,
        budget=budget, budget_used=used, model_params=plan.idx.total_params, skipped=plan.skipped,
        seconds=time.perf_counter() - t0,
    )


def _plan(model: str | Path, base: str | Path | None, opts: AnalyzeOptions) -> _Plan:
    """Open the checkpoints, select the matrices, settle every conflict (headers only)."""
    if opts.budget is not None and base is None:
        raise OptionError("budget recommends ranks for the delta MODEL - BASE; give a base model too", field="budget")
    device = resolve_device(opts.device)
    keep = module_filter(opts.include, opts.exclude)
    idx = open_model(model, "MODEL")
    bidx = open_model(base, "BASE") if base is not None else None
    mats = matrix_tensors(idx)
    check_includes_match(keep, [module_of(n) for n in mats], model)
    chosen = {n: k for n, k in mats.items() if keep(module_of(n))}
    selected = {n: k for n, k in chosen.items() if idx.tensors[n].numel}
    skipped = [{"tensor": n, "why": f"empty matrix {tuple(idx.tensors[n].shape)}: no spectrum"}
               for n in chosen if n not in selected]
    if not selected:
        raise OptionError(f"no non-empty matrix weight of {escape_name(model)} is selected; check include/exclude",
                          field="include")
    if bidx is not None:
        for n in selected:
            bi = bidx.tensors.get(n)
            if bi is None or bi.shape != idx.tensors[n].shape:
                why = "missing from BASE" if bi is None else f"shape {bi.shape} in BASE vs {idx.tensors[n].shape}"
                raise CheckpointError(f"{escape_name(n, 200)}: {why}; MODEL and BASE must share an architecture")
    budget = (parse_budget(opts.budget, idx.total_params)
              if opts.budget is not None and budget_rank(opts.budget) is None else None)  # "rN": after the spectra
    plan = _Plan(idx, bidx, selected, budget, max(opts.cap, max(opts.ranks)), device, skipped)
    _check_memory(plan, opts.exact_max)
    return plan


def _check_memory(plan: _Plan, exact_max: int) -> None:
    """Refuse, before reading any tensor, a matrix whose analysis cannot fit in memory: the tensor
    as read, its fp32 copy, the SVD's factors (all of them when exact) and, with a BASE, the
    base tensor and the delta."""
    def need(name: str) -> int:
        info = plan.idx.tensors[name]
        mn = min(info.shape)
        n = matrix_bytes(info.nbytes, info.shape, rank=mn if mn <= exact_max else plan.k_cap)
        return n + (matrix_bytes(info.nbytes, info.shape) if plan.bidx is not None else 0)

    name = max(plan.selected, key=need)
    check_fits(need(name), f"analysing {escape_name(name, 200)} {tuple(plan.idx.tensors[name].shape)}",
               "use a machine with more memory, or exclude it (exclude)")


def _analyze_all(plan: _Plan, opts: AnalyzeOptions, model, base, progress: Progress | None):
    """One ModuleAnalysis per selected matrix, in shard order; and the delta spectra by module."""
    kw: dict[str, Any] = dict(exact_max=opts.exact_max, cap=plan.k_cap, niter=opts.niter, seed=opts.seed,
                              device=plan.device)
    rows: list[ModuleAnalysis] = []
    delta_spectra: dict[str, tuple[Tensor, int, int]] = {}
    with LazyReader(plan.idx) as rm, (LazyReader(plan.bidx) if plan.bidx is not None else _Null()) as rb:
        order = rm.order(plan.selected)
        for i, name in enumerate(order):
            kind = plan.selected[name]
            w = rm.get(name)
            check_finite(w, name, model)
            M = oriented(w, kind)  # (out, in)
            stats = spectrum_stats(spectrum(M, name=name, **kw), opts.ranks)
            entry = ModuleAnalysis(module_of(name), name, kind, stats)
            if rb is not None:
                wb = rb.get(name)
                check_finite(wb, name, base)
                delta_spectra[entry.module] = _delta(entry, M, wb, opts.ranks, kw)
            rows.append(entry)
            del w, M
            if progress:
                progress("analyze", i + 1, len(order))
    return rows, delta_spectra


def _delta(entry: ModuleAnalysis, M: Tensor, wb: Tensor, ranks: Sequence[int],
           kw: dict[str, Any]) -> tuple[Tensor, int, int]:
    """Fill entry.delta and entry.rel_change from Δ = M − W_base; returns (Δ's singular values, m, n)."""
    D = M - oriented(wb, entry.kind)  # (out, in)
    dres = spectrum(D, name=entry.tensor, **kw)
    stats = entry.delta = spectrum_stats(dres, ranks, DELTA_ENERGIES)
    bnorm = float(wb.float().norm())
    entry.rel_change = stats.norm / bnorm if bnorm else (0.0 if stats.norm == 0 else math.inf)
    return dres.S, *dres.shape


def _recommend(rows: list[ModuleAnalysis], delta_spectra: dict[str, tuple[Tensor, int, int]], budget: int) -> int:
    """Set each row's recommended_rank (extract-lora's allocator); returns the parameters used."""
    alloc = allocate_budget(delta_spectra, budget)
    used = 0
    for e in rows:
        e.recommended_rank = alloc.get(e.module, 0)
        _, m, n = delta_spectra[e.module]
        used += e.recommended_rank * (m + n)
    return used


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- plot
# The figure lives in surgery.report.plots (matplotlib imported when drawn); re-exported here.

from surgery.report.plots import check_plot_path, layer_type, plot_spectra  # noqa: E402
