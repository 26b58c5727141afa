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
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from surgery.core.hf import resolve_device, torch_threads
from surgery.core.layers import check_includes_match, matrix_tensors, module_filter, module_of, open_model, oriented
from surgery.core.lowrank import SVDResult, allocate_budget, parse_budget, truncated_svd
from surgery.core.tensors import check_finite, check_fits, matrix_bytes
from surgery.errors import CheckpointError, OptionError, OutputError, SurgeryError
from surgery.io import CheckpointIndex, LazyReader, escape_name
from surgery.io.guards import check_output_file
from surgery.options.analyze import DEFAULT_RANKS, EXACT_MAX, RANDOMIZED_CAP, AnalyzeOptions

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
    opts = options.replace(**fields) if options is not None else AnalyzeOptions(**fields)
    plan = _plan(model, base, opts)
    with torch_threads(opts.threads):
        rows, delta_spectra = _analyze_all(plan, opts, model, base, progress)
    used = _recommend(rows, delta_spectra, plan.budget) if plan.budget is not None else None
    return AnalyzeResult(
        model=str(model), base=None if base is None else str(base), ranks=list(opts.ranks), modules=rows,
        method_note=method_note(opts.exact_max, plan.k_cap, opts.niter), effective_rank_definition=EFFECTIVE_RANK_DEF,
        budget=plan.budget, budget_used=used, model_params=plan.idx.total_params, skipped=plan.skipped,
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
    budget = parse_budget(opts.budget, idx.total_params) if opts.budget is not None else None
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


def layer_type(module: str) -> str:
    """Module name with layer indices replaced by '*': groups the same layer across blocks."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", module)


def check_plot_path(path: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> Path:
    """Validate a plot path before any work: known extension, matplotlib there, never an input
    or inside an input directory (a model directory as the working directory), its directory
    there, not there unless overwrite.

    Args:
        path: the plot file.
        overwrite: whether an existing file may be replaced.
        inputs: the checkpoints analysed (MODEL, BASE).

    Raises:
        OptionError: not .png / .svg / .pdf.
        OutputError: equal to or inside an input, exists (and overwrite is false), a directory,
            or its directory is missing.
        SurgeryError: matplotlib is not installed.

    Example:
        >>> check_plot_path("spectra.png", inputs=["fixtures/tiny-bert"])
        PosixPath('spectra.png')
    """
    import importlib.util

    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise OptionError(f"plot {escape_name(path)}: use a .png, .svg or .pdf file name", field="plot")
    if importlib.util.find_spec("matplotlib") is None:
        raise SurgeryError(_NO_MATPLOTLIB)
    return check_output_file(path, inputs=inputs, overwrite=overwrite, what="plot")


_NO_MATPLOTLIB = "plotting needs matplotlib, which is not installed; pip install 'surgery[plot]'"


def plot_spectra(result: AnalyzeResult, path: str | Path, *, overwrite: bool = False) -> Path:
    """Per layer type: normalised singular values (log scale) and the cumulative energy curve
    of each layer — of the delta when the analysis has a BASE, else of the weights. PNG/SVG/PDF
    by extension; written to a temporary sibling and renamed. The path is checked again
    (check_plot_path), against the checkpoints the result names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurgeryError(_NO_MATPLOTLIB) from None
    path = check_plot_path(path, overwrite, [p for p in (result.model, result.base) if p is not None])
    groups: dict[str, list[ModuleAnalysis]] = {}
    for m in result.modules:
        groups.setdefault(layer_type(m.module), []).append(m)
    which = "delta" if result.base is not None else "weight"
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 2.6 * len(groups)), squeeze=False)
    for row, (gname, mods) in enumerate(groups.items()):
        ax_s, ax_e = axes[row]
        for m in mods:
            st = m.delta if which == "delta" else m.weight
            if st is None:
                continue
            S = torch.tensor(st.singular_values, dtype=torch.float64)
            if not len(S) or float(S[0]) == 0.0:
                continue
            x = torch.arange(1, len(S) + 1)
            label = m.module if len(mods) <= 12 else None
            ax_s.semilogy(x, (S / S[0]).clamp_min(1e-12), lw=0.9, label=label)
            total = st.norm ** 2
            ax_e.plot(torch.cat([torch.zeros(1), x]), torch.cat([torch.zeros(1), S.pow(2).cumsum(0) / total]), lw=0.9)
        ax_s.set_title(f"{gname} ({which}): sigma_i / sigma_1", fontsize=8)
        ax_e.set_title(f"{gname} ({which}): energy kept at rank r", fontsize=8)
        ax_e.set_ylim(0, 1.02)
        for e in DELTA_ENERGIES if which == "delta" else ():
            ax_e.axhline(e, color="grey", lw=0.5, ls=":")
        for ax in (ax_s, ax_e):
            ax.tick_params(labelsize=7)
            ax.set_xlabel("rank", fontsize=7)
    fig.suptitle(escape_name(result.model) + (f" - {escape_name(result.base)}" if result.base else ""), fontsize=9)
    fig.tight_layout()
    tmp = path.parent / f".{path.stem}.surgery-tmp-{os.getpid()}{path.suffix}"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt too: no temporary file left
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write the plot {escape_name(path)} ({e.strerror or e}); nothing was "
                              "written") from None
        raise
    finally:
        plt.close(fig)
    return path
