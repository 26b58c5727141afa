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

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from surgery.ops.analyze import check_finite, check_includes_match, module_filter, open_model, oriented
from surgery.errors import OptionError
from surgery.io import LazyReader, ShardedWriter, atomic_output_dir, check_output_path, parse_size
from surgery.core.lowrank import lapack_threads, truncated_svd
from surgery.core.layers import tensor_kinds
from surgery.core.peft_format import LoraModule, write_adapter

Progress = Callable[[str, int, int], None]
METHODS = ("pissa", "milora", "olora")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
) -> tuple[Tensor, Tensor]:
    """LoRA factors A (r, in), B (out, r) of the (out, in) matrix M; residual = M − scaling·B·A."""
    m, n = M.shape
    if not 1 <= rank <= min(m, n):
        raise OptionError(f"rank {rank} is outside 1..min(out={m}, in={n}) for {name or 'the matrix'}; "
                          f"use --rank <= {min(m, n)} or --exclude it")
    if method not in METHODS:
        raise OptionError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if not (math.isfinite(scaling) and scaling > 0):
        raise OptionError(f"LoRA scale alpha/r must be positive and finite, got {scaling}")
    M = M.float()
    if method == "olora":
        with lapack_threads():
            Q = torch.linalg.qr(M[:, :rank], mode="reduced").Q  # (out, r), Householder (geqrf)
            A = Q.T @ M  # (r, in) == R[:r] of the full QR
        return A.contiguous(), Q.contiguous()
    if method == "pissa":
        res = truncated_svd(M, rank, method=svd, niter=niter, oversample=oversample, seed=seed, name=name)
        U, S, Vh = res.U, res.S, res.Vh  # (out, k), (k,), (k, in)
    else:  # milora: bottom-r of the full spectrum
        res = truncated_svd(M, None, method="exact", name=name)
        U, S, Vh = res.U[:, -rank:], res.S[-rank:], res.Vh[-rank:]  # (out, r), (r,), (r, in)
    if res.k < rank:  # zero matrix: truncated_svd returns no factors
        U = torch.cat([U, torch.zeros(m, rank - res.k)], 1)
        S = torch.cat([S, torch.zeros(rank - res.k)])
        Vh = torch.cat([Vh, torch.zeros(rank - res.k, n)], 0)
    root = (S / scaling).sqrt()  # (r,) PEFT divides S by the scale before the square root
    A = root[:, None] * Vh  # (r, in)
    B = U * root  # (out, r)
    return A.contiguous(), B.contiguous()


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


def _tied_head(name: str, config: dict | None) -> bool:
    return name.endswith("lm_head.weight") and bool((config or {}).get("tie_word_embeddings", True))


def init_lora(
    model: str | Path,
    out: str | Path,
    *,
    rank: int,
    method: str = "pissa",
    alpha: float | None = None,
    niter: int = 4,
    svd: str = "auto",
    oversample: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    seed: int = 0,
    adapter_dtype: str = "fp32",
    shard_size: str | int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> InitResult:
    """Write OUT/adapter (PEFT LoRA) and OUT/residual (model) so that residual + adapter == MODEL."""
    t0 = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise OptionError(f"--rank must be a positive integer, got {rank!r}")
    if method not in METHODS:
        raise OptionError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    alpha = float(rank if alpha is None else alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise OptionError(f"--alpha must be a positive number, got {alpha}")
    if adapter_dtype not in DTYPES:
        raise OptionError(f"--adapter-dtype must be one of {tuple(DTYPES)}, got {adapter_dtype!r}")
    scaling = alpha / rank
    out = Path(out)
    check_output_path(out, overwrite, [Path(model)])
    idx = open_model(model, "MODEL")
    shard_bytes = input_shard_size(idx) if shard_size is None else parse_size(shard_size)
    kinds = tensor_kinds(idx)
    keep = module_filter(include, exclude)
    cands = {n: k for n, k in kinds.items() if k in ("linear", "conv1d") and n.endswith(".weight")
             and len(idx.tensors[n].shape) == 2 and idx.tensors[n].dtype.is_floating_point}
    check_includes_match(keep, [n.rsplit(".", 1)[0] for n in cands], model)
    result = InitResult(out=out, method=method, rank=rank, alpha=alpha, scaling=scaling, modules=[],
                        adapter_dtype=adapter_dtype)
    targets: dict[str, str] = {}
    for n, k in cands.items():
        if not keep(n.rsplit(".", 1)[0]):
            continue
        if _tied_head(n, idx.config):
            result.skipped.append({"tensor": n, "why": "output head tied to the input embedding"})
            continue
        shape = idx.tensors[n].shape
        if rank > min(shape):
            raise OptionError(f"rank {rank} exceeds min{tuple(shape)} = {min(shape)} for {n}; "
                              f"use --rank <= {min(shape)} or --exclude '{n.rsplit('.', 1)[0]}'")
        targets[n] = k
    if not targets:
        raise OptionError(f"no Linear/Conv1D weight of {model} is selected; check --include/--exclude")

    modules: dict[str, LoraModule] = {}
    a_dt = DTYPES[adapter_dtype]
    res_dtypes = set()
    with atomic_output_dir(out, overwrite, [Path(model)]) as tmp, LazyReader(idx) as r:
        with ShardedWriter(tmp / "residual", shard_size=shard_bytes, metadata={"format": "pt"}) as w:
            order = r.order()
            for i, name in enumerate(order):
                t = r.get(name)
                if name not in targets:
                    w.add(name, t)
                    continue
                kind = targets[name]
                check_finite(t, name, model)
                M = oriented(t, kind)  # (out, in) fp32
                A, B = init_factors(M, rank, method, scaling, svd=svd, niter=niter, oversample=oversample,
                                    seed=seed, name=name)
                A, B = A.to(a_dt), B.to(a_dt)
                # the residual against the factors as stored, so the stored sum is as close to W as it can be
                R = M - scaling * (B.float() @ A.float())  # (out, in)
                R_st = (R.T if kind == "conv1d" else R).to(t.dtype).contiguous()
                res_dtypes.add(str(t.dtype).removeprefix("torch."))
                w.add(name, R_st)
                back = oriented(R_st, kind) + scaling * (B.float() @ A.float())  # (out, in)
                wn = float(M.norm())
                module = name.rsplit(".", 1)[0]
                modules[module] = LoraModule(module, "linear", A, B, scaling=scaling)
                result.modules.append(InitModule(
                    module, kind, tuple(M.shape), rank,
                    float(R.norm()) / wn if wn else 0.0, float((back - M).norm()) / wn if wn else 0.0,
                ))
                result.adapter_params += A.numel() + B.numel()
                if progress:
                    progress(method, i + 1, len(order))
            w.copy_files(idx.root)  # config, tokenizer, small config sub-folders (1_Pooling/)
        write_adapter(
            tmp / "adapter", modules, base_model_name_or_path=str(out / "residual"),
            fan_in_fan_out=any(k == "conv1d" for k in targets.values()),
        )
        result.residual_dtype = ",".join(sorted(res_dtypes))
        result.max_rel_error = max(m.rel_error for m in result.modules)
        result.seconds = time.perf_counter() - t0
        # no wall-clock time in the file: the same inputs give byte-identical outputs
        info = {k: v for k, v in result.to_json().items() if k not in ("out", "seconds")}
        (tmp / "init.json").write_text(json.dumps(info, indent=2) + "\n")
    return result
