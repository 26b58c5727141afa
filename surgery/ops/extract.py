"""extract-lora: a fine-tune's weight delta, compressed into a PEFT LoRA adapter.

Three phases, each consuming the previous one's output and never editing it:

  plan       from the headers (and the tiny bias vectors): pair base↔ft tensors, the layer
             kind of each, what becomes a LoRA / is saved whole / rides as a bias / is
             skipped, and every conflict settled (PEFT has no lora_bias on an Embedding
             LoRA) before the first SVD.
  decompose  one tensor at a time, in base shard order: read the delta in fp32 blocks,
             turn it into a row (LoRA factors + report row, a whole tensor, a bias delta,
             or a skip with its reason). The LoRA math is a pure function of the delta.
  assemble   rows -> LoRA modules (bias deltas on their module's lora_B.bias), whole
             tensors (a tied head beside its embedding), notes, the adapter directory.

Orientation (PEFT's delta is scale * B @ A, transposed where the layout asks):
  Linear    W (out, in):   Δ ≈ B @ A               A (r, in),    B (out, r)
  Conv1D    W (in, out):   Δᵀ ≈ B @ A              fan_in_fan_out: true
  Embedding W (vocab, d):  Δᵀ ≈ B @ A              lora_embedding_A (r, vocab), _B (d, r)
Every module gets scale exactly 1 (lora_alpha = r, rank_pattern/alpha_pattern).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.core.hf import parse_dtype, resolve_device
from surgery.core.layers import module_filter, tensor_kinds
from surgery.core.lowrank import allocate_budget, frob_sq, lapack_threads, lora_factors, truncated_svd
from surgery.core.peft_format import LoraModule, write_adapter
from surgery.core.tensors import all_finite, check_fits, require_finite
from surgery.errors import CheckpointError, OptionError, SurgeryError
from surgery.io import CheckpointIndex, LazyReader, check_output_path, escape_name, open_checkpoint
from surgery.options.extract import ExtractOptions, parse_budget

Progress = Callable[[str, int, int], None]
_ROW_BLOCK = 1 << 20  # elements per block when reading a delta


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModuleReport:
    module: str
    kind: str  # linear | conv1d | embedding
    shape: tuple[int, int]  # the matrix decomposed, (out, in) orientation
    rank: int
    params: int
    delta_norm: float  # ‖Δ‖_F
    rel_change: float  # ‖Δ‖_F / ‖W‖_F
    rel_error: float  # ‖Δ − B A‖_F / ‖Δ‖_F, of the factors as stored
    energy_kept: float
    method: str
    note: str = ""


@dataclass
class ExtractResult:
    """What extract_lora wrote, module by module, and why anything was left out."""

    out: Path
    modules: list[ModuleReport]
    full: list[str] = field(default_factory=list)  # tensors saved whole (modules_to_save)
    skipped: list[dict] = field(default_factory=list)  # deltas not in the adapter, with why
    notes: list[str] = field(default_factory=list)
    adapter_params: int = 0
    full_params: int = 0
    model_params: int = 0
    overall_rel_error: float = 0.0
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class TensorPlan:
    """One base↔ft tensor pair and what to do with it."""

    name: str
    kind: str  # layer kind (surgery.core.layers)
    action: str  # "lora" | "full" | "bias" | "skip" | "check" (non-float: must be equal)
    why: str = ""  # skip: the reason; full: why it is whole
    grown: bool = False  # vocabulary growth: no delta, saved whole
    instead_of_lora: bool = False  # a LoRA candidate saved whole to settle a conflict

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class ExtractPlan:
    tensors: tuple[TensorPlan, ...]  # in base shard order
    model_params: int
    budget_params: int | None  # the budget policy's parameter count
    cap: int | None  # rank cap of every SVD (None: all singular values)

    @property
    def lora(self) -> list[TensorPlan]:
        return [p for p in self.tensors if p.action == "lora"]


class _Pair:
    """The two open checkpoints; reads deltas a block of rows at a time."""

    def __init__(self, base_idx: CheckpointIndex, ft_idx: CheckpointIndex, rb: LazyReader, rf: LazyReader):
        self.base_idx, self.ft_idx, self.rb, self.rf = base_idx, ft_idx, rb, rf

    def ft(self, name: str) -> torch.Tensor:
        return _finite(name, self.rf.get(name), "fine-tune")

    def differs(self, name: str) -> bool:
        """Whether FT's tensor differs from BASE's (NaN counts as a difference), block by block."""
        shape = self.base_idx.tensors[name].shape
        if len(shape) == 0:
            return not torch.equal(self.rb.get(name), self.rf.get(name))
        step = max(1, _ROW_BLOCK // max(1, math.prod(shape[1:])))
        return any(not torch.equal(self.rb.get_rows(name, i, i + step), self.rf.get_rows(name, i, i + step))
                   for i in range(0, shape[0], step))

    def delta(self, name: str) -> tuple[torch.Tensor, float, float]:
        """(Δ in fp32, ‖Δ‖², ‖W‖²), read a block of rows at a time from both files, so memory
        is Δ plus two small blocks. Finiteness is read off the norms (NaN/Inf propagate into
        them), so no extra pass over the data is needed."""
        shape = self.base_idx.tensors[name].shape
        d = torch.empty(shape, dtype=torch.float32)
        wsq = 0.0
        if len(shape) == 0:
            d.copy_(self.rf.get(name).float() - self.rb.get(name).float())
            wsq = float(self.rb.get(name).float()) ** 2
        else:
            step = max(1, _ROW_BLOCK // max(1, math.prod(shape[1:])))
            for i in range(0, shape[0], step):
                wb, wf = self.rb.get_rows(name, i, i + step), self.rf.get_rows(name, i, i + step)
                torch.sub(wf.float(), wb.float(), out=d[i : i + step])
                wsq += _sq_norm_fp32(wb)  # only feeds the report's relative change
        dsq = _sq_norm(d)  # fp64: it sets the reported errors
        if not (math.isfinite(dsq) and math.isfinite(wsq)):
            _finite(name, self.rb.get(name), "base")
            _finite(name, self.rf.get(name), "fine-tune")
            if not math.isfinite(dsq):
                raise CheckpointError(f"{name}: the delta overflows fp32 (values too large)")
        return d, dsq, wsq


def _finite(name: str, w: torch.Tensor, who: str) -> torch.Tensor:
    if not all_finite(w):
        raise CheckpointError(f"{name}: non-finite values (NaN/Inf) in the {who} checkpoint")
    return w


def _paired_shapes(base_idx: CheckpointIndex, ft_idx: CheckpointIndex, kinds: Mapping[str, str]) -> set[str]:
    """Check that base and fine-tune hold the same tensors and shapes; the names whose
    vocabulary grew (the only shape change that can be extracted)."""
    b, f = base_idx.tensors, ft_idx.tensors
    missing = [n for n in b if n not in f]
    extra = [n for n in f if n not in b]
    if missing or extra:
        which = f"missing from FT: {missing[:3]}" if missing else f"only in FT: {extra[:3]}"
        raise CheckpointError(
            f"base and fine-tune have different tensors ({which}{' …' if len(missing or extra) > 3 else ''}); "
            "they must share an architecture"
        )
    grown = set()
    for name, bi in b.items():
        fi, kind = f[name], kinds[name]
        if bi.shape == fi.shape:
            continue
        vocab_growth = (
            (kind == "embedding" or (kind == "linear" and name.endswith("lm_head.weight")))
            and len(bi.shape) == 2 and bi.shape[1] == fi.shape[1] and fi.shape[0] > bi.shape[0]
        )
        if not vocab_growth:
            raise CheckpointError(
                f"{name}: shape {tuple(bi.shape)} in base but {tuple(fi.shape)} in fine-tune; "
                "only vocabulary growth (more embedding rows) can be extracted"
            )
        grown.add(name)
    return grown


_EXCLUDED = "excluded by include/exclude"
_GREW = "vocabulary grew: saved whole"


def _tensor_plan(name: str, kind: str, floating: bool, grown: bool, selected: bool,
                 opts: ExtractOptions) -> TensorPlan:
    """What to do with one tensor, from its kind and the options alone (conflicts come later)."""
    if not floating:
        return TensorPlan(name, kind, "check")
    if kind in ("linear", "conv1d"):
        if not selected:
            return TensorPlan(name, kind, "skip", _EXCLUDED)
        return TensorPlan(name, kind, "full", _GREW, grown=True) if grown else TensorPlan(name, kind, "lora")
    if kind == "embedding":
        if not selected or opts.embeddings == "skip":
            return TensorPlan(name, kind, "skip", "embeddings='skip'" if selected else _EXCLUDED)
        if grown or opts.embeddings == "full":
            return TensorPlan(name, kind, "full", _GREW if grown else "embeddings='full'", grown=grown)
        return TensorPlan(name, kind, "lora")
    if kind == "bias":
        return TensorPlan(name, kind, "bias")
    if kind != "norm":  # buffers and other float tensors
        return TensorPlan(name, kind, "skip", f"{kind} tensor")
    if not selected:
        return TensorPlan(name, kind, "skip", _EXCLUDED)
    if opts.effective_other_deltas == "skip":
        return TensorPlan(name, kind, "skip", "serving_safe (no modules_to_save)" if opts.serving_safe
                          else "other_deltas='skip'")
    return TensorPlan(name, kind, "full")


_NO_LORA_BIAS = "PEFT cannot combine lora_bias with an embedding LoRA"


def _settle_lora_bias(plans: list[TensorPlan], pair: _Pair, opts: ExtractOptions) -> list[TensorPlan]:
    """Bias deltas ride on lora_B.bias of their module's LoRA (lora_bias: true), which PEFT
    refuses beside an Embedding LoRA. Settled here, before any SVD: with bias='skip' the bias
    deltas are dropped; else, when both a bias delta and an embedding delta exist, the
    embeddings are saved whole (modules_to_save), or, where nothing may be saved whole
    (other_deltas='skip' / serving_safe), the bias deltas are dropped.
    Reads the bias vectors (tiny) and, only in that case, compares the embeddings."""
    by_name = {p.name: p for p in plans}

    def rides(p: TensorPlan) -> bool:
        weight = by_name.get(p.module + ".weight")
        return weight is not None and weight.action == "lora" and weight.kind in ("linear", "conv1d")

    def replaced(which: set[str], **change: Any) -> list[TensorPlan]:
        return [dataclasses.replace(p, **change) if p.name in which else p for p in plans]

    biases = [p for p in plans if p.action == "bias"]
    if opts.bias == "skip":
        return replaced({p.name for p in biases}, action="skip", why="bias='skip'")
    plans = replaced({p.name for p in biases if not rides(p)}, action="skip",
                     why="its weight has no LoRA (bias not representable)")
    riding = [p for p in biases if rides(p)]
    embeddings = [p for p in plans if p.kind == "embedding" and p.action == "lora"]
    if not (riding and embeddings and any(pair.differs(p.name) for p in riding)):
        return plans
    changed = {p.name for p in embeddings if pair.differs(p.name)}
    if not changed:
        return plans
    if opts.effective_other_deltas == "skip":
        return replaced({p.name for p in riding}, action="skip",
                        why=f"bias deltas dropped: {_NO_LORA_BIAS}, and nothing is saved whole "
                        "(other_deltas='skip' / serving_safe)")
    return replaced(changed, action="full", instead_of_lora=True,
                    why=f"{_NO_LORA_BIAS}; bias='skip' keeps it a LoRA and drops the bias deltas")


def plan_extraction(pair: _Pair, opts: ExtractOptions) -> ExtractPlan:
    """Every decision that the headers (and the bias vectors) allow, before any SVD.

    Args:
        pair: the open base and fine-tune checkpoints.
        opts: the validated options.
    Returns:
        ExtractPlan: one TensorPlan per tensor in base shard order, the budget in parameters
        (budget policy) and the rank cap of every SVD.
    Raises:
        CheckpointError: the checkpoints hold different tensors, or shapes differ beyond
            vocabulary growth.
        OptionError: an include pattern matches no module; nothing is selected for LoRA.

    Example:
        >>> with LazyReader(bi) as rb, LazyReader(fi) as rf:
        ...     plan = plan_extraction(_Pair(bi, fi, rb, rf), ExtractOptions(rank=4))
        >>> {p.action for p in plan.tensors}
        {'lora', 'full', 'bias'}
    """
    base_idx = pair.base_idx
    kinds = tensor_kinds(base_idx)
    grown = _paired_shapes(base_idx, pair.ft_idx, kinds)
    keep = module_filter(opts.include, opts.exclude)
    for pattern in opts.include:
        if not any(re.search(pattern, n.rsplit(".", 1)[0]) for n in base_idx.tensors):
            raise OptionError(f"include {pattern!r} matches no module of {base_idx.source}", field="include")
    plans = [_tensor_plan(name, kinds[name], t.dtype.is_floating_point, name in grown, keep(name.rsplit(".", 1)[0]),
                          opts) for name, t in base_idx.tensors.items()]
    if not any(p.action == "lora" for p in plans):
        raise OptionError("no Linear/Conv1D/Embedding weight is selected for LoRA; check include/exclude and "
                          "embeddings")
    plans = _settle_lora_bias(plans, pair, opts)
    order = pair.rb.order([p.name for p in plans])
    by_name = {p.name: p for p in plans}
    budget = parse_budget(opts.budget, base_idx.total_params) if opts.budget is not None else None
    return ExtractPlan(tuple(by_name[n] for n in order), base_idx.total_params, budget, opts.rank_cap)


# ----------------------------------------------------------------------------- decompose


@dataclass(frozen=True)
class Row:
    """What one tensor contributes to the adapter and the report."""

    name: str
    lora: LoraModule | None = None
    report: ModuleReport | None = None
    whole: torch.Tensor | None = None  # saved whole (modules_to_save)
    bias: torch.Tensor | None = None  # a bias delta for its module's lora_B.bias (fp32)
    skipped: dict | None = None
    note: str = ""
    sq_err: float = 0.0  # this LoRA's ‖Δ − B A‖², for the overall error
    sq_tot: float = 0.0  # this LoRA's ‖Δ‖²


@dataclass(frozen=True)
class _SVDSettings:
    method: str
    niter: int
    seed: int
    device: torch.device

    def kw(self) -> dict:
        return dict(method=self.method, niter=self.niter, seed=self.seed, device=self.device)


def _sq_norm(t: torch.Tensor) -> float:
    """‖t‖²_F accumulated in fp64, a block at a time."""
    if t.numel() == 0:  # an empty tensor: no rows to reshape into
        return 0.0
    return frob_sq(t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1))


def _sq_norm_fp32(t: torch.Tensor) -> float:
    """‖t‖²_F in fp32 blocks (no full-size upcast copy); for reports, not for error bounds."""
    flat = t.reshape(-1)
    step = 1 << 18
    return sum(float(torch.linalg.vector_norm(flat[i : i + step].float())) ** 2 for i in range(0, flat.numel(), step))


def _cast_sq_error(B: torch.Tensor, A: torch.Tensor, Bq: torch.Tensor, Aq: torch.Tensor) -> float:
    """‖B A − Bq Aq‖²_F (what casting the factors costs), from r x r Gram matrices in fp64.

    With X = [B, Bq] (m, 2r) and Y = [A; −Aq] (2r, n): ‖X Y‖² = tr((XᵀX)(Y Yᵀ)), so
    no (m, n) product is formed. The SVD residual R = M − BA is orthogonal to B's
    columns and A's rows, so ‖M − Bq Aq‖² = ‖R‖² + this, up to second-order terms.
    """
    X = torch.cat([B, Bq], dim=1).double()  # (m, 2r)
    Y = torch.cat([A, -Aq], dim=0).double()  # (2r, n)
    return max(0.0, float(torch.trace((X.T @ X) @ (Y @ Y.T))))


def _orient(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """The matrix that B @ A approximates, from a delta in storage layout."""
    return delta.T if kind in ("conv1d", "embedding") else delta


def decompose_lora(p: TensorPlan, d: torch.Tensor, total: float, wsq: float, k: int | None,
                   opts: ExtractOptions, out_dtype: torch.dtype, svd: _SVDSettings,
                   budget_rank: int | None = None) -> Row:
    """One delta -> LoRA factors and its report row (a pure function of the delta).

    k is the number of singular triplets to compute; the rank kept is k (fixed rank), the
    smallest reaching opts.energy, or budget_rank. The error reported is that of the factors
    as stored (the SVD's exact truncation error plus what the cast to out_dtype costs)."""
    name = p.name
    if total == 0.0:
        return Row(name, skipped={"tensor": name, "why": "delta is zero"})
    if budget_rank == 0:
        return Row(name, skipped={"tensor": name, "why": "budget gave rank 0", "delta_norm": math.sqrt(total)},
                   sq_err=total, sq_tot=total)
    M = _orient(d, p.kind)  # (out, in)
    res = truncated_svd(M, k, name=name, total_energy=total, **svd.kw())
    r = res.k
    if opts.energy is not None:
        r = max(1, res.rank_for_energy(float(opts.energy)))
    if budget_rank is not None:
        r = min(budget_rank, res.k)
    A32, B32 = lora_factors(res, r)  # (r, in), (out, r)
    A, B = A32.to(out_dtype), B32.to(out_dtype)
    err = res.sq_error(r)
    if out_dtype != torch.float32:
        err += _cast_sq_error(B32, A32, B.float(), A.float())
    note = ""
    if opts.energy is not None and res.energy_kept(r) < float(opts.energy):
        note = f"energy {res.energy_kept(r):.3f} < {opts.energy} at the max rank {r}"
    wnorm = math.sqrt(wsq)
    report = ModuleReport(
        p.module, p.kind, (int(M.shape[0]), int(M.shape[1])), r, A.numel() + B.numel(), math.sqrt(total),
        math.sqrt(total) / wnorm if wnorm else math.inf, math.sqrt(err / total), 1.0 - err / total, res.method, note,
    )
    kind = "embedding" if p.kind == "embedding" else "linear"
    module = LoraModule(p.module, kind, A.contiguous(), B.contiguous(), scaling=1.0)
    return Row(name, lora=module, report=report, sq_err=err, sq_tot=total)


def _whole_row(p: TensorPlan, pair: _Pair, out_dtype: torch.dtype | None) -> Row:
    """A tensor saved whole: the fine-tune's, in the adapter dtype (default its own)."""
    note = ""
    if p.grown:  # no delta (shapes differ), but saved whole: still checked
        rows_b, rows_f = pair.base_idx.tensors[p.name].shape[0], pair.ft_idx.tensors[p.name].shape[0]
        note = (f"{p.name}: vocabulary grew from {rows_b} to {rows_f} rows; saved whole in modules_to_save — "
                f"call base.resize_token_embeddings({rows_f}) before loading the adapter")
    else:
        d = pair.delta(p.name)[0]
        if not d.any():
            return Row(p.name, skipped={"tensor": p.name, "why": "delta is zero"} if p.instead_of_lora else None)
        if p.instead_of_lora:
            note = f"{p.name}: saved whole ({p.why})"
    wf = pair.ft(p.name)
    return Row(p.name, whole=wf.to(out_dtype or wf.dtype), note=note)


def _other_row(p: TensorPlan, pair: _Pair) -> Row:
    """A non-float tensor that must not change, a skipped delta, or a bias delta."""
    if p.action == "check":
        if torch.equal(pair.rb.get(p.name), pair.rf.get(p.name)):
            return Row(p.name)
        return Row(p.name, skipped={"tensor": p.name, "why": "non-float tensor differs; not representable"})
    if p.grown:  # skipped, and no delta to report
        return Row(p.name)
    d = pair.delta(p.name)[0]
    if not d.any():
        return Row(p.name)
    if p.action == "bias":
        return Row(p.name, bias=d)
    return Row(p.name, skipped={"tensor": p.name, "why": p.why, "delta_norm": float(d.norm())})


def _budget_ranks(plan: ExtractPlan, budget: int, pair: _Pair, svd: _SVDSettings,
                  progress: Progress | None) -> dict[str, int]:
    """The budget policy's first pass: every LoRA candidate's spectrum, then the allocator."""
    lora = plan.lora
    spectra = {}
    for i, p in enumerate(lora):
        d = pair.delta(p.name)[0]
        res = truncated_svd(_orient(d, p.kind), plan.cap, name=p.name, **svd.kw())
        del d
        m, n = res.shape
        spectra[p.name] = (res.S, m, n)
        if progress:
            progress("spectra", i + 1, len(lora))
    return allocate_budget(spectra, budget)


def decompose(plan: ExtractPlan, pair: _Pair, opts: ExtractOptions, svd: _SVDSettings,
              progress: Progress | None = None) -> list[Row]:
    """One row per planned tensor, in shard order; one delta in memory at a time."""
    out_dtype = parse_dtype(opts.dtype)
    ranks = None if plan.budget_params is None else _budget_ranks(plan, plan.budget_params, pair, svd, progress)
    rows = []
    for i, p in enumerate(plan.tensors):
        if p.action == "lora":
            d, total, wsq = pair.delta(p.name)
            dtype = out_dtype or pair.base_idx.tensors[p.name].dtype
            rank = None if ranks is None else ranks[p.name]
            k = plan.cap if rank is None else rank
            rows.append(decompose_lora(p, d, total, wsq, k, opts, dtype, svd, budget_rank=rank))
            del d
        elif p.action == "full":
            rows.append(_whole_row(p, pair, out_dtype))
        else:
            rows.append(_other_row(p, pair))
        if progress:
            progress("extract", i + 1, len(plan.tensors))
    return rows


# ----------------------------------------------------------------------------- assemble


@dataclass
class _Adapter:
    modules: dict[str, LoraModule]
    whole: dict[str, torch.Tensor]
    skipped: list[dict]
    notes: list[str]


def _collect(rows: list[Row]) -> _Adapter:
    """LoRA modules with their bias deltas (lora_B.bias), whole tensors, skips and notes."""
    modules = {r.lora.module: r.lora for r in rows if r.lora is not None}
    whole = {r.name: r.whole for r in rows if r.whole is not None}
    skipped = [r.skipped for r in rows if r.skipped is not None]
    notes = [r.note for r in rows if r.note]
    for r in rows:
        if r.bias is None:
            continue
        module = r.name.rsplit(".", 1)[0]
        if module in modules and modules[module].kind == "linear":
            modules[module] = dataclasses.replace(modules[module], bias=r.bias.to(modules[module].B.dtype))
        else:  # its weight's delta was zero, or the budget gave it rank 0
            skipped.append({"tensor": r.name, "why": "its weight has no LoRA (bias not representable)",
                            "delta_norm": float(r.bias.norm())})
    return _Adapter(modules, whole, skipped, notes)


def _tied_heads(ad: _Adapter, tied: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tied output heads: a LoRA on the embedding reaches the head once merged; an embedding
    saved whole takes its head along, so PEFT's unmerged model (which wraps a copy of the
    embedding) changes the logits exactly as the fine-tune does."""
    notes = []
    for head, src in tied.items():
        if src.rsplit(".", 1)[0] in ad.modules:
            notes.append(f"{head} is tied to {src}: its LoRA reaches the output head once merged; unmerged PEFT "
                         "applies it to the output head only for embed_tokens/lm_head names (ensure_weight_tying)")
    heads = {}
    for head, src in tied.items():
        if src in ad.whole and head not in ad.whole:
            heads[head] = ad.whole[src]
            notes.append(f"{head} is tied to {src}: saved whole beside it (modules_to_save)")
    return heads, notes


def assemble(plan: ExtractPlan, rows: list[Row], opts: ExtractOptions, base: Path, ft: Path, out: Path,
             tied: Mapping[str, str], report_options: dict | None = None, t0: float | None = None) -> ExtractResult:
    """Write the adapter directory (atomically) and return the report (timed from t0)."""
    ad = _collect(rows)
    if not ad.modules:
        raise SurgeryError(f"{base} and {ft} have no weight differences to extract; nothing was written")
    heads, tied_notes = _tied_heads(ad, tied)
    whole = {**ad.whole, **heads}
    notes = ad.notes + tied_notes
    if opts.serving_safe and whole:
        notes.append(f"serving_safe: {len(whole)} tensor(s) saved whole in modules_to_save anyway "
                     "(a grown vocabulary cannot be a LoRA)")
    sq_err = sum(r.sq_err for r in rows)
    sq_tot = sum(r.sq_tot for r in rows)
    tied_sources = {src.rsplit(".", 1)[0] for src in tied.values()}
    # PEFT decides the orientation per layer (Conv1D: transposed, Linear: not) and only
    # warns about the flag, so one adapter may hold both kinds.
    fan_in_fan_out = any(p.kind == "conv1d" for p in plan.lora)
    stored = [(f"{n} {slot}", t) for n, m in ad.modules.items()  # as written: after the cast to the adapter dtype
              for slot, t in (("lora_A", m.A), ("lora_B", m.B), ("lora_B.bias", m.bias)) if t is not None]
    require_finite(stored + list(whole.items()), "the adapter", "the delta is too large to store in that dtype; "
                   "exclude this module, or use dtype fp32 for an fp16/bf16 adapter")
    write_adapter(
        out, ad.modules, full_tensors=whole, base_model_name_or_path=str(base), task_type=opts.task_type,
        fan_in_fan_out=fan_in_fan_out, overwrite=opts.overwrite, inputs=[base, ft],
        # a delta on a tied input embedding must reach the output head too: PEFT ties the
        # adapter copies when asked
        extra_config={"ensure_weight_tying": True} if tied_sources & set(ad.modules) else None,
    )
    reports = [r.report for r in rows if r.report is not None]
    return ExtractResult(
        out=out, modules=reports, full=list(whole), skipped=ad.skipped, notes=notes,
        adapter_params=sum(m.params for m in reports) + sum(m.bias.numel() for m in ad.modules.values()
                                                            if m.bias is not None),
        full_params=sum(t.numel() for t in ad.whole.values()), model_params=plan.model_params,
        overall_rel_error=math.sqrt(sq_err / sq_tot) if sq_tot else 0.0,
        options=dict(report_options or {}), seconds=time.perf_counter() - t0 if t0 is not None else 0.0,
    )


# ----------------------------------------------------------------------------- entry point


def _options(options: ExtractOptions | None, fields: dict[str, Any]) -> ExtractOptions:
    if options is None:
        return ExtractOptions(**fields)
    if not isinstance(options, ExtractOptions):
        raise TypeError(f"options must be an ExtractOptions, got {type(options).__name__}")
    return options.replace(**fields) if fields else options


def _open_models(base: Path, ft: Path) -> tuple[CheckpointIndex, CheckpointIndex]:
    base_idx, ft_idx = open_checkpoint(base), open_checkpoint(ft)
    for idx, what in ((base_idx, "BASE"), (ft_idx, "FT")):
        if idx.kind != "model":
            raise CheckpointError(f"{idx.source}: {what} is an adapter directory; give a model checkpoint")
    return base_idx, ft_idx


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
    else:
        with lapack_threads(n):
            yield


def _options_report(opts: ExtractOptions, device: torch.device) -> dict:
    """The options as the report records them (the values in force)."""
    return {
        "rank": opts.effective_rank, "energy": opts.energy, "budget": opts.budget, "svd": opts.svd,
        "niter": opts.niter, "max_rank": opts.max_rank, "include": list(opts.include),
        "exclude": list(opts.exclude), "embeddings": opts.embeddings, "other_deltas": opts.effective_other_deltas,
        "bias": opts.bias, "dtype": opts.dtype, "device": str(device), "seed": opts.seed,
    }


def extract_lora(
    base: str | Path,
    ft: str | Path,
    out: str | Path,
    options: ExtractOptions | None = None,
    *,
    progress: Progress | None = None,
    **fields: Any,
) -> ExtractResult:
    """Extract FT − BASE into a PEFT LoRA adapter directory at OUT.

    Streams one tensor pair at a time (base shard order) and decomposes each delta with a
    truncated SVD in fp32; see the module docstring for the phases.

    Args:
        base, ft: model checkpoints (directories or files) of the same architecture.
        out: the adapter directory to write (atomically).
        options: an ExtractOptions; `fields` (its field names) build it or replace fields of it.
        progress: optional callback(stage, done, total).
    Returns:
        ExtractResult: one report row per LoRA module, tensors saved whole, skipped deltas
        with their reasons, notes, parameter counts and the overall relative error.
    Raises:
        OptionError: a bad option (field named), an include pattern that matches nothing,
            nothing selected, an unavailable device.
        CheckpointError: unreadable inputs, different tensors or shapes, NaN/Inf.
        OutputError: OUT exists (without overwrite) or overlaps an input.
        SurgeryError: the two models do not differ.

    Example:
        >>> res = extract_lora("fixtures/tiny-bert", "fixtures/tiny-bert-ft", "out/lora", rank=4)
        >>> res.overall_rel_error < 1, len(res.modules)
        (True, 13)
    """
    opts = _options(options, fields)
    t0 = time.perf_counter()
    base, ft, out = Path(base), Path(ft), Path(out)
    check_output_path(out, opts.overwrite, [base, ft])
    svd = _SVDSettings(opts.svd, opts.niter, opts.seed, resolve_device(opts.device))
    base_idx, ft_idx = _open_models(base, ft)
    with _threads(opts.threads), LazyReader(base_idx) as rb, LazyReader(ft_idx) as rf:
        pair = _Pair(base_idx, ft_idx, rb, rf)
        plan = plan_extraction(pair, opts)
        big = max(plan.tensors, key=lambda p: base_idx.tensors[p.name].numel)  # each delta is held in fp32
        check_fits(4 * base_idx.tensors[big.name].numel, f"the fp32 delta of {escape_name(big.name, 200)}")
        rows = decompose(plan, pair, opts, svd, progress)
    return assemble(plan, rows, opts, base, ft, out, base_idx.tied, _options_report(opts, svd.device), t0)


__all__ = ["extract_lora", "ExtractOptions", "ExtractResult", "ModuleReport", "plan_extraction", "decompose",
           "decompose_lora", "assemble", "ExtractPlan", "TensorPlan", "Row"]
