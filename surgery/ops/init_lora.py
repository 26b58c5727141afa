"""init-lora: SVD/QR-initialised LoRA factors plus the residual base they belong to.

For each selected Linear / Conv1D weight W, in (out, in) orientation (Conv1D's
stored (in, out) is transposed first, as PEFT does with fan_in_fan_out), with
scale s = alpha / r:

  pissa   top-r singular triplets (PiSSA, Meng et al. 2024), PEFT's convention:
          A = diag(√(S_r / s)) V_rᵀ (r, in),  B = U_r diag(√(S_r / s)) (out, r)
          so s·B·A = U_r S_r V_rᵀ. Randomized SVD with oversampling (max(10, r/4)
          extra columns, `niter` power iterations) where it is faster (--svd auto);
          PEFT's own fast path (pissa_niter_K) uses torch.svd_lowrank with none.
  milora  the same from the bottom-r triplets (MiLoRA, Wang et al. 2024): the
          minor components, exact SVD (a randomized range finder cannot find them).
  olora   QR (OLoRA, Büyükakyüz 2024), PEFT's convention: W = Q R,
          B = Q[:, :r] (out, r), A = R[:r] (r, in), no division by s, so
          s·B·A = s·Q_r R_r. Only the first r columns of Q are needed: they are the
          Householder QR of W[:, :r] (the first r reflectors see only those
          columns), and R[:r] = Q_rᵀ W. That is O(out·in·r) instead of PEFT's full
          QR, O(out·in·min(out, in)).

The residual W_res = W − s·B·A is computed in fp32 and stored in the input dtype,
so `PeftModel.from_pretrained(residual_model, OUT/adapter)` computes the original
model at initialisation. Output directory (written atomically):

  OUT/adapter/     PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors),
                   init_lora_weights: true (the factors are in the file; PEFT must not
                   re-run its own init on load), base_model_name_or_path = OUT/residual
  OUT/residual/    the model with W replaced by W_res (same tensor names, dtypes,
                   shard size limit: the input's largest shard unless given;
                   config/tokenizer files and sub-folders copied)
  OUT/init.json    method, rank, alpha and the per-module reconstruction error

Adapter dtype defaults to fp32: PEFT upcasts bf16/fp16 adapters to fp32 anyway
(autocast_adapter_dtype), and fp32 factors keep W_res + s·B·A = W to fp32
rounding; the residual in bf16 is then the only rounding (relative error ≲ 2⁻⁹
of ‖W_res‖, measured ≤ 4e-3·‖W‖ on the tiny Llama, see tests/test_init.py).

Targets: every Linear / Conv1D weight (not embeddings), filtered by
include/exclude; an output head tied to the input embedding is skipped (loading
would re-tie it and drop its residual).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from surgery.core.hf import parse_dtype, refuse_quantized, resolve_device, torch_threads
from surgery.core.layers import (
    PROJECTION_KINDS,
    check_includes_match,
    matrix_tensors,
    module_filter,
    module_of,
    open_model,
    oriented,
    tied_head,
)
from surgery.core.lowrank import lapack_threads, truncated_svd
from surgery.core.peft_format import LoraModule, write_adapter
from surgery.core.tensors import check_finite, check_fits, matrix_bytes, require_finite
from surgery.errors import OptionError
from surgery.io import (
    CheckpointIndex,
    LazyReader,
    ShardedWriter,
    atomic_output_dir,
    check_output_path,
    escape_name,
    parse_size,
)
from surgery.options.init import INIT_METHODS, InitLoraOptions
from surgery.report.cards import options_dict, write_card

__all__ = ["InitLoraOptions", "InitModule", "InitResult", "init_factors", "init_lora", "input_shard_size", "METHODS"]

Progress = Callable[[str, int, int], None]
METHODS = INIT_METHODS


def init_factors(
    M: Tensor,
    rank: int,
    method: str,
    scaling: float = 1.0,
    *,
    svd: str = "auto",
    niter: int = 4,
    oversample: int | None = None,
    seed: int = 0,
    name: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """LoRA factors A (r, in), B (out, r) of the (out, in) matrix M; residual = M − scaling·B·A.

    Args:
        M: the (out, in) weight (any real dtype; computed in fp32).
        rank: r, within 1..min(out, in).
        method: "pissa", "milora" or "olora" (see the module docstring).
        scaling: the LoRA scale alpha / r (PEFT's convention for each method).
        svd, niter, oversample, seed: the SVD engine's settings (pissa).
        name: the tensor's name, for messages.
        device: where the SVD / QR runs; the factors are CPU fp32.

    Raises:
        OptionError: rank out of range, unknown method, scale not positive and finite.

    Example:
        >>> A, B = init_factors(torch.randn(64, 32), 4, "pissa", 2.0)
        >>> A.shape, B.shape
        (torch.Size([4, 32]), torch.Size([64, 4]))
    """
    m, n = M.shape
    if not 1 <= rank <= min(m, n):
        raise OptionError(f"rank {rank} is outside 1..min(out={m}, in={n}) for "
                          f"{escape_name(name, 200) if name else 'the matrix'}; "
                          f"use rank <= {min(m, n)} or exclude it", field="rank")
    if method not in METHODS:
        raise OptionError(f"unknown method {method!r}; use one of {', '.join(METHODS)}", field="method")
    if not (math.isfinite(scaling) and scaling > 0):
        raise OptionError(f"LoRA scale alpha/r must be positive and finite, got {scaling}", field="alpha")
    M = M.float()
    if method == "olora":
        return _olora(M, rank, resolve_device(device))
    if method == "pissa":
        res = truncated_svd(M, rank, method=svd, niter=niter, oversample=oversample, seed=seed, name=name,
                            device=device)
        U, S, Vh = res.U, res.S, res.Vh  # (out, k), (k,), (k, in)
    else:  # milora: bottom-r of the full spectrum
        res = truncated_svd(M, None, method="exact", name=name, device=device)
        U, S, Vh = res.U[:, -rank:], res.S[-rank:], res.Vh[-rank:]  # (out, r), (r,), (r, in)
    if res.k < rank:  # zero matrix: truncated_svd returns no factors
        U = torch.cat([U, torch.zeros(m, rank - res.k)], 1)
        S = torch.cat([S, torch.zeros(rank - res.k)])
        Vh = torch.cat([Vh, torch.zeros(rank - res.k, n)], 0)
    root = (S / scaling).sqrt()  # (r,) PEFT divides S by the scale before the square root
    A = root[:, None] * Vh  # (r, in)
    B = U * root  # (out, r)
    return A.contiguous(), B.contiguous()


def _olora(M: Tensor, rank: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """OLoRA's A = R[:r] (r, in), B = Q[:, :r] (out, r), from the QR of M's first r columns."""
    Md = M.to(device)
    with lapack_threads() if device.type == "cpu" else contextlib.nullcontext():
        Q = torch.linalg.qr(Md[:, :rank], mode="reduced").Q  # (out, r), Householder (geqrf)
        A = Q.T @ Md  # (r, in) == R[:r] of the full QR
    return A.to("cpu").contiguous(), Q.to("cpu").contiguous()


@dataclass
class InitModule:
    module: str
    kind: str  # linear | conv1d
    shape: tuple[int, int]  # (out, in)
    rank: int
    rel_residual: float  # ‖W_res‖_F / ‖W‖_F
    rel_error: float  # ‖W − (W_res + s·B·A)‖_F / ‖W‖_F, everything as stored


@dataclass
class InitResult:
    out: Path
    method: str
    rank: int
    alpha: float
    scaling: float
    modules: list[InitModule]
    skipped: list[dict] = field(default_factory=list)
    adapter_params: int = 0
    max_rel_error: float = 0.0
    residual_dtype: str = ""
    adapter_dtype: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def input_shard_size(idx) -> int:
    """The input's shard size limit, as well as it can be told: its largest shard (5GB if one file)."""
    if len(idx.shards) <= 1:
        return parse_size("5GB")
    sizes: dict = {}
    for t in idx.tensors.values():
        sizes[t.shard] = sizes.get(t.shard, 0) + t.nbytes
    return max(sizes.values())


def init_lora(
    model: str | Path,
    out: str | Path,
    options: InitLoraOptions | None = None,
    *,
    progress: Progress | None = None,
    **fields,
) -> InitResult:
    """Write OUT/adapter (PEFT LoRA) and OUT/residual (model) so that residual + adapter == MODEL.

    Args:
        model: the model checkpoint (file or directory; never modified).
        out: the output directory (written atomically).
        options: an InitLoraOptions; None builds one from FIELDS (rank=..., method=..., ...).
        progress: called as progress(method, done, total) after each initialised weight.
        **fields: InitLoraOptions fields, replacing those of `options`.

    Returns:
        An InitResult: per module, the relative size of the residual and the reconstruction error.

    Raises:
        OptionError: a bad option (naming its field), a rank above a selected weight's
            min(out, in), a pattern matching nothing, nothing selected.
        CheckpointError: unreadable input, an adapter directory, NaN/Inf in a selected weight.
        OutputError: OUT exists (and overwrite is false) or lies inside the input.

    Example:
        >>> res = init_lora("model/", "out/pissa", rank=16, method="pissa", alpha=32)
        >>> res.max_rel_error < 1e-5
        True
    """
    t0 = time.perf_counter()
    opts = InitLoraOptions.build(options, **fields)
    out = Path(out)
    check_output_path(out, opts.overwrite, [Path(model)])
    device = resolve_device(opts.device)
    idx = open_model(model, "MODEL")
    refuse_quantized(model, idx.config)  # OUT/residual would carry its quantization_config and not load
    shard_bytes = input_shard_size(idx) if opts.shard_size is None else parse_size(opts.shard_size)
    result = InitResult(out=out, method=opts.method, rank=cast(int, opts.rank), alpha=opts.lora_alpha,
                        scaling=opts.scaling, modules=[], adapter_dtype=opts.adapter_dtype)
    targets = _targets(idx, opts, model, result.skipped)
    with atomic_output_dir(out, opts.overwrite, [Path(model)]) as tmp, torch_threads(opts.threads):
        modules = _write_residual(idx, tmp / "residual", shard_bytes, targets, opts, device, result, progress)
        write_adapter(
            tmp / "adapter", modules, base_model_name_or_path=str(out / "residual"),
            fan_in_fan_out=any(k == "conv1d" for k in targets.values()),
        )
        result.max_rel_error = max(m.rel_error for m in result.modules)
        result.seconds = time.perf_counter() - t0
        # no wall-clock time in the file: the same inputs give byte-identical outputs
        info = {k: v for k, v in result.to_json().items() if k not in ("out", "seconds")}
        (tmp / "init.json").write_text(json.dumps(info, indent=2) + "\n")
        _card(tmp, result, opts, model)
    return result


def _card(tmp: Path, res: InitResult, opts: InitLoraOptions, model: str | Path) -> None:
    """The output's model card (README.md at OUT), written into the temporary directory before its rename."""
    summary = {"LoRA modules": len(res.modules), "LoRA parameters": res.adapter_params,
               "method": res.method, "rank": res.rank, "scaling (alpha / r)": res.scaling,
               "largest reconstruction error |W - (W_res + s B A)| / |W|": f"{res.max_rel_error:.3g}",
               "modules skipped": len(res.skipped)}
    write_card(tmp, "init-lora", str(model), options_dict(opts), summary, inputs=[model], tags=["lora", res.method])


def _targets(idx: CheckpointIndex, opts: InitLoraOptions, model, skipped: list[dict]) -> dict[str, str]:
    """tensor -> kind of the weights to initialise (headers only); tied heads go to `skipped`."""
    keep = module_filter(opts.include, opts.exclude)
    cands = matrix_tensors(idx, allowed=PROJECTION_KINDS)
    check_includes_match(keep, [module_of(n) for n in cands], model)
    targets: dict[str, str] = {}
    for n, k in cands.items():
        if not keep(module_of(n)):
            continue
        if tied_head(n, idx.config):
            skipped.append({"tensor": n, "why": "output head tied to the input embedding"})
            continue
        shape = idx.tensors[n].shape
        if min(shape) == 0:
            skipped.append({"tensor": n, "why": f"empty matrix {tuple(shape)}: no factors to initialise"})
            continue
        if cast(int, opts.rank) > min(shape):
            raise OptionError(f"rank {opts.rank} exceeds min{tuple(shape)} = {min(shape)} for {escape_name(n, 200)}; "
                              f"use rank <= {min(shape)} or exclude '{escape_name(module_of(n), 200)}'", field="rank")
        targets[n] = k
    if not targets:
        raise OptionError(f"no non-empty Linear/Conv1D weight of {escape_name(model)} is selected; check "
                          "include/exclude", field="include")
    _check_memory(idx, targets, opts)
    return targets


def _check_memory(idx: CheckpointIndex, targets: dict[str, str], opts: InitLoraOptions) -> None:
    """Refuse, before the output is started, a weight whose initialisation cannot fit in memory:
    the tensor as read, three fp32 copies (the matrix, the residual, the check of the stored
    sum) and the SVD's factors (the whole spectrum for milora or an exact SVD)."""
    def need(name: str) -> int:
        info = idx.tensors[name]
        full = opts.method == "milora" or (opts.method == "pissa" and opts.svd == "exact")
        return matrix_bytes(info.nbytes, info.shape, rank=min(info.shape) if full else opts.rank, copies=3)

    name = max(targets, key=need)
    check_fits(need(name), f"initialising {escape_name(name, 200)} {tuple(idx.tensors[name].shape)}",
               "use a machine with more memory, or exclude it (exclude)")


def _write_residual(idx: CheckpointIndex, dst: Path, shard_bytes: int, targets: dict[str, str],
                    opts: InitLoraOptions, device: torch.device, result: InitResult,
                    progress: Progress | None) -> dict[str, LoraModule]:
    """Stream the model into DST with each target replaced by its residual; the LoRA modules by name."""
    modules: dict[str, LoraModule] = {}
    res_dtypes: set[str] = set()
    with LazyReader(idx) as r, ShardedWriter(dst, shard_size=shard_bytes, metadata={"format": "pt"}) as w:
        order = r.order()
        for i, name in enumerate(order):
            t = r.get(name)
            if name not in targets:
                w.add(name, t)
                continue
            check_finite(t, name, idx.source or idx.root)
            R_st, lora, row = _init_one(t, name, targets[name], opts, device)
            w.add(name, R_st)
            res_dtypes.add(str(t.dtype).removeprefix("torch."))
            modules[row.module] = lora
            result.modules.append(row)
            result.adapter_params += lora.A.numel() + lora.B.numel()
            if progress:
                progress(opts.method, i + 1, len(order))
        w.copy_files(idx.root)  # config, tokenizer, small config sub-folders (1_Pooling/)
    result.residual_dtype = ",".join(sorted(res_dtypes))
    return modules


def _init_one(t: Tensor, name: str, kind: str, opts: InitLoraOptions,
              device: torch.device) -> tuple[Tensor, LoraModule, InitModule]:
    """The stored residual, the LoRA module and the report row of one weight."""
    s = opts.scaling
    M = oriented(t, kind)  # (out, in) fp32
    rank = cast(int, opts.rank)  # required: validated by the options object
    A, B = init_factors(M, rank, opts.method, s, svd=opts.svd, niter=opts.niter, oversample=opts.oversample,
                        seed=opts.seed, name=name, device=device)
    a_dt = parse_dtype(opts.adapter_dtype, "adapter_dtype")
    A, B = A.to(a_dt), B.to(a_dt)
    # the residual against the factors as stored, so the stored sum is as close to W as it can be
    R = M - s * (B.float() @ A.float())  # (out, in)
    R_st = (R.T if kind == "conv1d" else R).to(t.dtype).contiguous()
    require_finite([(module_of(name) + " lora_A", A), (module_of(name) + " lora_B", B), (name + " (residual)", R_st)],
                   "the initialised tensors", "they overflow the dtype they are stored in: use adapter_dtype fp32, "
                   "or exclude this module")
    back = oriented(R_st, kind) + s * (B.float() @ A.float())  # (out, in)
    wn = float(M.norm())
    module = module_of(name)
    row = InitModule(module, kind, (M.shape[0], M.shape[1]), rank,
                     float(R.norm()) / wn if wn else 0.0, float((back - M).norm()) / wn if wn else 0.0)
    return R_st, LoraModule(module, "linear", A, B, scaling=s), row
