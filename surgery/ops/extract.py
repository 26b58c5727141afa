"""extract-lora: a fine-tune's weight delta, compressed into a PEFT LoRA adapter.

Streaming: base and fine-tune are read one tensor pair at a time (base shard
order); each delta is decomposed in fp32 and only its low-rank factors are kept.
Everything that can be checked from headers (keys, shapes, filters, ranks) is
checked before the first SVD.

Orientation (PEFT's delta is scale * B @ A, transposed where the layout asks):
  Linear    W (out, in):   Δ ≈ B @ A               A (r, in),    B (out, r)
  Conv1D    W (in, out):   Δᵀ ≈ B @ A              fan_in_fan_out: true
  Embedding W (vocab, d):  Δᵀ ≈ B @ A              lora_embedding_A (r, vocab), _B (d, r)
Every module gets scale exactly 1 (lora_alpha = r, rank_pattern/alpha_pattern).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from surgery.errors import CheckpointError, OptionError, SurgeryError
from surgery.io import LazyReader, check_output_path, open_checkpoint
from surgery.core.lowrank import allocate_budget, frob_sq, lora_factors, parse_budget, truncated_svd
from surgery.core.layers import module_filter, tensor_kinds
from surgery.core.peft_format import LoraModule, write_adapter
from surgery.core.tensors import all_finite

Progress = Callable[[str, int, int], None]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EMBEDDING_MODES = ("lora", "full", "skip")
OTHER_MODES = ("full", "skip")
DEFAULT_MAX_RANK = 256  # cap for energy/budget policies with the randomized engine


@dataclass
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


@dataclass
class _Plan:
    """One base↔ft tensor pair and what to do with it."""

    name: str
    kind: str
    action: str  # "lora" | "full" | "skip" | "bias"
    why: str = ""
    grown: bool = False


def _plan(base_idx, ft_idx, kinds, embeddings, other_deltas, keep) -> list[_Plan]:
    b, f = base_idx.tensors, ft_idx.tensors
    missing = [n for n in b if n not in f]
    extra = [n for n in f if n not in b]
    if missing or extra:
        which = f"missing from FT: {missing[:3]}" if missing else f"only in FT: {extra[:3]}"
        raise CheckpointError(
            f"base and fine-tune have different tensors ({which}{' …' if len(missing or extra) > 3 else ''}); "
            "they must share an architecture"
        )
    plans = []
    for name, bi in b.items():
        fi = f[name]
        kind = kinds[name]
        grown = False
        if bi.shape != fi.shape:
            vocab_growth = (
                kind == "embedding" or (kind == "linear" and name.endswith("lm_head.weight"))
            ) and len(bi.shape) == 2 and bi.shape[1] == fi.shape[1] and fi.shape[0] > bi.shape[0]
            if not vocab_growth:
                raise CheckpointError(
                    f"{name}: shape {tuple(bi.shape)} in base but {tuple(fi.shape)} in fine-tune; "
                    "only vocabulary growth (more embedding rows) can be extracted"
                )
            grown = True
        module = name.rsplit(".", 1)[0]
        if not bi.dtype.is_floating_point:
            plans.append(_Plan(name, kind, "check"))
        elif kind in ("linear", "conv1d"):
            if not keep(module):
                plans.append(_Plan(name, kind, "skip", "excluded by --include/--exclude"))
            elif grown:
                plans.append(_Plan(name, kind, "full", "vocabulary grew: saved whole", grown))
            else:
                plans.append(_Plan(name, kind, "lora"))
        elif kind == "embedding":
            if not keep(module) or embeddings == "skip":
                why = "--embeddings skip" if keep(module) else "excluded by --include/--exclude"
                plans.append(_Plan(name, kind, "skip", why))
            elif grown or embeddings == "full":
                why = "vocabulary grew: saved whole" if grown else "--embeddings full"
                plans.append(_Plan(name, kind, "full", why, grown))
            else:
                plans.append(_Plan(name, kind, "lora"))
        elif kind == "bias":
            plans.append(_Plan(name, kind, "bias"))
        else:  # norms and other float tensors
            act = "full" if other_deltas == "full" and kind == "norm" and keep(module) else "skip"
            why = "" if act == "full" else f"{kind} tensor" if kind != "norm" else (
                "--other-deltas skip" if keep(module) else "excluded by --include/--exclude")
            plans.append(_Plan(name, kind, act, why))
    if not any(p.action == "lora" for p in plans):
        raise OptionError(
            "no Linear/Conv1D/Embedding weight is selected for LoRA; check --include/--exclude and --embeddings"
        )
    return plans


def _sq_norm(t: torch.Tensor) -> float:
    """‖t‖²_F accumulated in fp64, a block at a time."""
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


def extract_lora(
    base: str | Path,
    ft: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: str | int | None = None,
    svd: str = "auto",
    niter: int = 4,
    max_rank: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    embeddings: str = "lora",
    other_deltas: str = "full",
    bias: str = "lora",
    dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    task_type: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExtractResult:
    """Extract FT − BASE into a PEFT LoRA adapter at OUT. See module docstring."""
    t0 = time.perf_counter()
    policies = [p for p in (rank, energy, budget) if p is not None]
    if len(policies) > 1:
        raise OptionError("give only one of --rank, --energy, --budget")
    if not policies:
        rank = 16
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise OptionError(f"--rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise OptionError(f"--energy must be in (0, 1], got {energy}")
    if embeddings not in EMBEDDING_MODES:
        raise OptionError(f"--embeddings must be one of {EMBEDDING_MODES}, got {embeddings!r}")
    if other_deltas not in OTHER_MODES:
        raise OptionError(f"--other-deltas must be one of {OTHER_MODES}, got {other_deltas!r}")
    if bias not in ("lora", "skip"):
        raise OptionError(f"--bias must be 'lora' or 'skip', got {bias!r}")
    if dtype is not None and dtype not in DTYPES:
        raise OptionError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if max_rank is not None and max_rank < 1:
        raise OptionError(f"--max-rank must be >= 1, got {max_rank}")
    out = Path(out)
    check_output_path(out, overwrite, [Path(base), Path(ft)])

    base_idx, ft_idx = open_checkpoint(base), open_checkpoint(ft)
    for idx, what in ((base_idx, "BASE"), (ft_idx, "FT")):
        if idx.kind != "model":
            raise CheckpointError(f"{idx.source}: {what} is an adapter directory; give a model checkpoint")
    kinds = tensor_kinds(base_idx)
    keep = module_filter(include, exclude)
    for p in keep.include:
        if not any(p.search(n.rsplit(".", 1)[0]) for n in base_idx.tensors):
            raise OptionError(f"--include {p.pattern!r} matches no module of {base}")
    plans = _plan(base_idx, ft_idx, kinds, embeddings, other_deltas, keep)
    lora_plans = [p for p in plans if p.action == "lora"]
    model_params = base_idx.total_params
    budget_params = parse_budget(budget, model_params) if budget is not None else None
    cap = max_rank
    if rank is not None:
        cap = rank if max_rank is None else min(rank, max_rank)
    elif cap is None and svd != "exact":
        cap = DEFAULT_MAX_RANK

    result = ExtractResult(out=out, modules=[], model_params=model_params, options={
        "rank": rank, "energy": energy, "budget": budget, "svd": svd, "niter": niter, "max_rank": max_rank,
        "include": list(include), "exclude": list(exclude), "embeddings": embeddings,
        "other_deltas": other_deltas, "bias": bias, "dtype": dtype, "device": device, "seed": seed,
    })
    svd_kw = dict(method=svd, niter=niter, seed=seed, device=device)

    with LazyReader(base_idx) as rb, LazyReader(ft_idx) as rf:
        def finite(name: str, w: torch.Tensor, who: str) -> torch.Tensor:
            if not all_finite(w):
                raise CheckpointError(f"{name}: non-finite values (NaN/Inf) in the {who} checkpoint")
            return w

        def delta_of(p: _Plan):
            """(Δ in fp32, ‖Δ‖², ‖W‖²), read a block of rows at a time from both files, so
            memory is Δ plus two small blocks. Finiteness is read off the norms (NaN/Inf
            propagate into them), so no extra pass over the data is needed."""
            shape = base_idx.tensors[p.name].shape
            d = torch.empty(shape, dtype=torch.float32)
            wsq = 0.0
            if len(shape) == 0:
                d.copy_(rf.get(p.name).float() - rb.get(p.name).float())
                wsq = float(rb.get(p.name).float()) ** 2
            else:
                step = max(1, (1 << 20) // max(1, math.prod(shape[1:])))
                for i in range(0, shape[0], step):
                    wb, wf = rb.get_rows(p.name, i, i + step), rf.get_rows(p.name, i, i + step)
                    torch.sub(wf.float(), wb.float(), out=d[i : i + step])
                    wsq += _sq_norm_fp32(wb)  # only feeds the report's relative change
            dsq = _sq_norm(d)  # fp64: it sets the reported errors
            if not (math.isfinite(dsq) and math.isfinite(wsq)):
                finite(p.name, rb.get(p.name), "base")
                finite(p.name, rf.get(p.name), "fine-tune")
                if not math.isfinite(dsq):
                    raise CheckpointError(f"{p.name}: the delta overflows fp32 (values too large)")
            return d, dsq, wsq

        # Budget: first pass for the spectra, then the allocator picks ranks.
        ranks: dict[str, int] = {}
        if budget_params is not None:
            spectra = {}
            lora_by_name = {q.name: q for q in lora_plans}
            for i, name in enumerate(rb.order(lora_by_name)):
                plan = lora_by_name[name]
                d = delta_of(plan)[0]
                res = truncated_svd(_orient(d, plan.kind), cap, name=name, **svd_kw)
                del d
                m, n = res.shape
                spectra[name] = (res.S, m, n)
                if progress:
                    progress("spectra", i + 1, len(lora_plans))
            ranks = allocate_budget(spectra, budget_params)

        modules: dict[str, LoraModule] = {}
        full: dict[str, torch.Tensor] = {}
        biases: dict[str, torch.Tensor] = {}
        sq_err = sq_tot = 0.0
        by_name = {p.name: p for p in plans}
        order = rb.order([p.name for p in plans])
        for i, name in enumerate(order):
            p = by_name[name]
            module = name.rsplit(".", 1)[0]
            if p.action == "check":
                if not torch.equal(rb.get(name), rf.get(name)):
                    result.skipped.append({"tensor": name, "why": "non-float tensor differs; not representable"})
                continue
            # A grown tensor has no delta (shapes differ) but is saved whole: still check it.
            d = M = res = None  # release the previous delta before reading the next
            d, total, wsq = delta_of(p) if not p.grown else (None, 0.0, 0.0)
            if p.action == "full":
                wf = finite(name, rf.get(name), "fine-tune")
                if p.grown:
                    result.notes.append(
                        f"{name}: vocabulary grew from {base_idx.tensors[name].shape[0]} to "
                        f"{ft_idx.tensors[name].shape[0]} rows; saved whole in modules_to_save — call "
                        f"base.resize_token_embeddings({ft_idx.tensors[name].shape[0]}) before loading the adapter"
                    )
                elif not d.any():
                    continue
                out_dt = DTYPES[dtype] if dtype else wf.dtype
                full[name] = wf.to(out_dt)
                result.full.append(name)
                result.full_params += wf.numel()
                continue
            if p.action == "bias":
                if d.any():
                    biases[module] = d
                continue
            if p.action == "skip":
                if d is not None and d.any():
                    result.skipped.append({"tensor": name, "why": p.why, "delta_norm": float(d.norm())})
                continue
            # LoRA
            out_dt = DTYPES[dtype] if dtype else base_idx.tensors[name].dtype
            M = _orient(d, p.kind)  # (out, in)
            sq_tot += total
            if total == 0.0:
                result.skipped.append({"tensor": name, "why": "delta is zero"})
                continue
            k = ranks.get(name, cap) if budget_params is not None else cap
            if budget_params is not None and k == 0:
                sq_err += total
                result.skipped.append({"tensor": name, "why": "budget gave rank 0", "delta_norm": math.sqrt(total)})
                continue
            res = truncated_svd(M, k, name=name, total_energy=total, **svd_kw)
            r = res.k
            if energy is not None:
                r = max(1, res.rank_for_energy(float(energy)))
            if budget_params is not None:
                r = min(ranks[name], res.k)
            A32, B32 = lora_factors(res, r)  # (r, in), (out, r)
            A, B = A32.to(out_dt), B32.to(out_dt)
            # the error of the factors as stored: the SVD's exact truncation error plus
            # what the cast to the adapter dtype costs
            err = res.sq_error(r)
            if out_dt != torch.float32:
                err += _cast_sq_error(B32, A32, B.float(), A.float())
            note = ""
            if energy is not None and res.energy_kept(r) < float(energy):
                note = f"energy {res.energy_kept(r):.3f} < {energy} at the max rank {r}"
            sq_err += err
            kind = "embedding" if p.kind == "embedding" else "linear"
            modules[module] = LoraModule(module, kind, A.contiguous(), B.contiguous(), scaling=1.0)
            wnorm = math.sqrt(wsq)
            result.modules.append(ModuleReport(
                module, p.kind, tuple(M.shape), r, A.numel() + B.numel(), math.sqrt(total),
                math.sqrt(total) / wnorm if wnorm else math.inf, math.sqrt(err / total),
                1.0 - err / total, res.method, note,
            ))
            result.adapter_params += A.numel() + B.numel()
            if progress:
                progress("extract", i + 1, len(order))

    # PEFT refuses lora_bias on Embedding layers: bias deltas and embedding LoRAs
    # cannot share one adapter. Keep the biases (cheap) and save embeddings whole,
    # or drop the biases where modules_to_save is not wanted (--bias skip / serving-safe).
    emb = [m for m in modules.values() if m.kind == "embedding"]
    if biases and emb and (bias == "skip" or other_deltas == "skip"):
        for module, d in biases.items():
            result.skipped.append({"tensor": module + ".bias", "why": "bias deltas skipped (--bias skip, or "
                                   "embedding LoRA without modules_to_save: PEFT has no lora_bias on embeddings)",
                                   "delta_norm": float(d.norm())})
        biases = {}
    elif biases and emb:
        with LazyReader(ft_idx) as rf:
            for m in emb:
                name = m.module + ".weight"
                wf = rf.get(name)
                full[name] = wf.to(DTYPES[dtype] if dtype else wf.dtype)
                result.full.append(name)
                result.full_params += wf.numel()
                del modules[m.module]
                rep = next(r for r in result.modules if r.module == m.module)
                result.modules.remove(rep)
                result.adapter_params -= rep.params
                # saved whole, it is no LoRA: its error and norm leave the overall error
                sq_err = max(0.0, sq_err - (rep.rel_error * rep.delta_norm) ** 2)
                sq_tot = max(0.0, sq_tot - rep.delta_norm ** 2)
                result.notes.append(f"{name}: saved whole (PEFT cannot combine lora_bias with an embedding LoRA; "
                                    "--bias skip keeps it a LoRA and drops the bias deltas)")
    elif bias == "skip":
        for module, d in biases.items():
            result.skipped.append({"tensor": module + ".bias", "why": "--bias skip", "delta_norm": float(d.norm())})
        biases = {}
    # Bias deltas ride on lora_B.bias of their module (lora_bias: true).
    for module, d in biases.items():
        if module in modules and modules[module].kind == "linear":
            modules[module].bias = d.to(modules[module].B.dtype)
            result.adapter_params += d.numel()
        else:
            result.skipped.append({"tensor": module + ".bias", "why": "its weight has no LoRA (bias not representable)",
                                   "delta_norm": float(d.norm())})
    if not modules:
        raise SurgeryError(f"{base} and {ft} have no weight differences to extract; nothing was written")
    for head, src in base_idx.tied.items():
        if src.rsplit(".", 1)[0] in modules:
            result.notes.append(
                f"{head} is tied to {src}: its LoRA reaches the output head once merged; unmerged PEFT "
                "applies it to the output head only for embed_tokens/lm_head names (ensure_weight_tying)"
            )
    result.overall_rel_error = math.sqrt(sq_err / sq_tot) if sq_tot else 0.0
    # A tied output head shares the input embedding. When the embedding is saved
    # whole, save the head whole too, so PEFT's unmerged model (which wraps a copy
    # of the embedding) changes the logits exactly as the fine-tune does.
    for head, src in base_idx.tied.items():
        if src in full and head not in full:
            full[head] = full[src]
            result.full.append(head)
            result.notes.append(f"{head} is tied to {src}: saved whole beside it (modules_to_save)")
    # A delta on a tied input embedding must reach the output head too: PEFT ties
    # the adapter copies when asked (ensure_weight_tying).
    tied_sources = {src.rsplit(".", 1)[0] for src in base_idx.tied.values()}
    tied_touched = bool(tied_sources & set(modules))
    # PEFT decides the orientation per layer (Conv1D: transposed, Linear: not) and
    # only warns about the flag, so one adapter may hold both kinds.
    fan_in_fan_out = any(p.kind == "conv1d" and p.action == "lora" for p in plans)
    write_adapter(
        out, modules, full_tensors=full, base_model_name_or_path=str(Path(base)),
        task_type=task_type, fan_in_fan_out=fan_in_fan_out, overwrite=overwrite,
        extra_config={"ensure_weight_tying": True} if tied_touched else None,
        inputs=[Path(base), Path(ft)],
    )
    result.seconds = time.perf_counter() - t0
    return result
