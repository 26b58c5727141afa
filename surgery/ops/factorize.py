"""factorize: replace Linear / Conv1D weights by two low-rank factors where that saves parameters.

A weight W (out, in) becomes B (out, r) · A (r, in), from its truncated SVD with
√S on both sides (A = √S_r V_rᵀ, B = U_r √S_r, the best rank-r approximation,
Eckart–Young). The parameter count goes from out·in to r·(out + in); a module is
factorised only when the saving 1 − r·(out + in)/(out·in) is at least
`min_savings`. Rank policy: a fixed `rank`, or the smallest rank keeping
`energy` of ‖W‖²_F (exact SVD for min(out, in) ≤ 1024, else randomized top-
`max_rank`, default 256).

Output: a Hugging Face model directory whose factorised modules are stored as an
nn.Sequential of two bias-free/biased nn.Linear layers (Conv1D included: its
(in, out) weight becomes Linear layers):

    <module>.0.weight  A (r, in)        first Linear(in, r, bias=False)
    <module>.1.weight  B (out, r)       second Linear(r, out), bias = the original bias
    <module>.1.bias    (out,)

every other tensor unchanged, config/tokenizer files copied, and
``factorization.json``:

    {"format": "surgery-factorized", "format_version": 1,
     "modules": {"<module>": {"rank": r, "in_features": in, "out_features": out,
                              "bias": true, "kind": "linear" | "conv1d"}}}

`load_factorized(dir)` builds the architecture named in config.json (transformers,
no remote code), swaps the listed modules for the two-Linear Sequential and loads
the state dict strictly (only tied weights and non-persistent buffers may be
absent/extra). After writing, `factorize` loads the original and the factorised
model and reports the output error on seeded random token inputs: max abs diff
and cosine similarity (per token, mean and min) of the last hidden state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from surgery.ops.analyze import check_finite, check_includes_match, module_filter, open_model, oriented, spectrum
from surgery.errors import CheckpointError, OptionError, SurgeryError
from surgery.ops.init_lora import _tied_head
from surgery.io import LazyReader, ShardedWriter, open_checkpoint, parse_size
from surgery.core.lowrank import lora_factors, truncated_svd
from surgery.core.layers import tensor_kinds

Progress = Callable[[str, int, int], None]
FORMAT = "surgery-factorized"
FORMAT_VERSION = 1
META_NAME = "factorization.json"


@dataclass
class FactorModule:
    module: str
    kind: str
    shape: tuple[int, int]  # (out, in)
    rank: int
    params_before: int
    params_after: int
    rel_error: float  # ‖W − B A‖_F / ‖W‖_F (factors as stored)
    energy_kept: float


@dataclass
class FactorizeResult:
    out: Path
    modules: list[FactorModule]
    skipped: list[dict] = field(default_factory=list)  # selected but kept dense, with why
    params_before: int = 0  # whole model
    params_after: int = 0
    output_check: dict | None = None  # {"max_abs_diff", "cosine_mean", "cosine_min", "inputs"} or {"skipped": why}
    seconds: float = 0.0

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["params_saved"] = self.params_saved
        return d


def savings(rank: int, m: int, n: int) -> float:
    """Fraction of the m·n parameters saved by rank-r factors."""
    return 1.0 - rank * (m + n) / (m * n)


def factorize(
    model: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    min_savings: float = 0.2,
    max_rank: int = 256,
    niter: int = 4,
    seed: int = 0,
    shard_size: str | int = "5GB",
    evaluate: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> FactorizeResult:
    """Write a factorised copy of MODEL to OUT (see the module docstring)."""
    t0 = time.perf_counter()
    if (rank is None) == (energy is None):
        raise OptionError("give exactly one of --rank and --energy")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise OptionError(f"--rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise OptionError(f"--energy must be in (0, 1], got {energy}")
    if not 0.0 <= float(min_savings) < 1.0:
        raise OptionError(f"--min-savings must be in [0, 1), got {min_savings}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise OptionError(f"--max-rank must be a positive integer, got {max_rank!r}")
    shard_bytes = parse_size(shard_size)
    out = Path(out)
    idx = open_model(model, "MODEL")
    kinds = tensor_kinds(idx)
    keep = module_filter(include, exclude)
    cands = {n: k for n, k in kinds.items() if k in ("linear", "conv1d") and n.endswith(".weight")
             and len(idx.tensors[n].shape) == 2 and idx.tensors[n].dtype.is_floating_point}
    check_includes_match(keep, [n.rsplit(".", 1)[0] for n in cands], model)
    result = FactorizeResult(out=out, modules=[], params_before=idx.total_params)
    targets = {}
    for n, k in cands.items():
        module = n.rsplit(".", 1)[0]
        if not keep(module):
            continue
        if _tied_head(n, idx.config):
            result.skipped.append({"module": module, "why": "output head tied to the input embedding"})
            continue
        shape = idx.tensors[n].shape
        m, nn_ = (shape[1], shape[0]) if k == "conv1d" else shape
        if rank is not None and savings(min(rank, m, nn_), m, nn_) < min_savings:
            result.skipped.append({"module": module, "why": f"rank {rank} saves {100 * savings(min(rank, m, nn_), m, nn_):.1f}%"
                                   f" of {m}x{nn_} < --min-savings {100 * min_savings:g}%"})
            continue
        targets[n] = k
    if not targets:
        raise OptionError(f"no Linear/Conv1D weight of {model} would be factorised (see --include/--exclude, "
                          f"--min-savings; e.g. rank r saves {100 * min_savings:g}% only when r <= "
                          f"{1 - min_savings:g}·out·in/(out+in))")

    meta: dict[str, dict] = {}
    params_after = idx.total_params
    with ShardedWriter(out, shard_size=shard_bytes, overwrite=overwrite, inputs=[Path(model)]) as w, \
            LazyReader(idx) as r:
        order = r.order()
        biases = {n.rsplit(".", 1)[0] + ".bias" for n in targets}
        # Biases are small; one that comes before its weight in the file (sorted keys: ".bias" <
        # ".weight") waits until the weight's SVD decides its name (X.bias or X.1.bias).
        pending: dict[str, Tensor] = {}
        decided: dict[str, bool] = {}  # module -> factorised?

        def add_bias(module: str, t: Tensor) -> None:
            w.add(module + (".1.bias" if decided[module] else ".bias"), t)

        for i, name in enumerate(order):
            t = r.get(name)
            module = name.rsplit(".", 1)[0]
            if name in biases:
                if module in decided:
                    add_bias(module, t)
                else:
                    pending[module] = t
                continue
            if name not in targets:
                w.add(name, t)
                continue
            kind = targets[name]
            check_finite(t, name, model)
            M = oriented(t, kind)  # (out, in)
            om, on = M.shape
            if rank is not None:
                res = truncated_svd(M, min(rank, om, on), method="auto", niter=niter, seed=seed, name=name)
                k = res.k
            else:
                res = spectrum(M, cap=max_rank, niter=niter, seed=seed, name=name)
                k = max(1, res.rank_for_energy(float(energy))) if res.k else 0
            decided[module] = k > 0 and savings(k, om, on) >= min_savings
            if not decided[module]:
                why = "zero matrix" if k == 0 else (
                    f"rank {k} for {energy} energy saves {100 * savings(k, om, on):.1f}% < --min-savings "
                    f"{100 * min_savings:g}%")
                result.skipped.append({"module": module, "why": why})
                w.add(name, t)
            else:
                A, B = lora_factors(res, k)  # (k, in), (out, k)
                A, B = A.to(t.dtype).contiguous(), B.to(t.dtype).contiguous()
                w.add(module + ".0.weight", A)
                w.add(module + ".1.weight", B)
                err = float((M - B.float() @ A.float()).norm())
                wn = float(M.norm())
                meta[module] = {"rank": k, "in_features": on, "out_features": om,
                                "bias": module + ".bias" in idx.tensors, "kind": kind}
                after = k * (om + on)
                params_after += after - om * on
                result.modules.append(FactorModule(module, kind, (om, on), k, om * on, after,
                                                   err / wn if wn else 0.0, res.energy_kept(k)))
            if module in pending:
                add_bias(module, pending.pop(module))
            if progress:
                progress("factorize", i + 1, len(order))
        if not meta:
            raise OptionError(f"no module of {model} reaches --min-savings {min_savings} at the chosen "
                              f"{'rank' if rank else 'energy'}; nothing was written")
        w.copy_files(idx.root)
        w.write_json(META_NAME, {"format": FORMAT, "format_version": FORMAT_VERSION, "modules": meta})
    result.params_after = params_after
    if evaluate:
        result.output_check = output_check(model, out)
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- load


def _hf_class(config):
    import transformers

    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    return cls or transformers.AutoModel


def _quiet_load(fn):
    import contextlib
    import io
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()):
        return fn()


def factored_linear(in_features: int, out_features: int, rank: int, bias: bool) -> nn.Sequential:
    """x -> B (A x) + b: Linear(in, r, bias=False) then Linear(r, out, bias)."""
    return nn.Sequential(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))


def load_factorized(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model with the factorised layers of a `surgery factorize` output, in eval mode."""
    from transformers import AutoConfig

    path = Path(path)
    meta_path = path / META_NAME
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: cannot read ({e}); is {path} a `surgery factorize` output?") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} v{FORMAT_VERSION} file; re-run surgery factorize")
    try:
        config = _quiet_load(lambda: AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False))
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read config.json ({str(e).splitlines()[0]})") from None
    cls = _hf_class(config)
    model = _quiet_load(lambda: cls(config))
    for name, spec in meta.get("modules", {}).items():
        try:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            getattr(parent, child)
            r, n, m, b = int(spec["rank"]), int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise CheckpointError(f"{meta_path}: module {name!r} is not in {cls.__name__} or its entry is malformed")
        setattr(parent, child, factored_linear(n, m, r, b))
    idx = open_checkpoint(path)
    with LazyReader(idx) as rd:
        sd = dict(rd.iter())
    expected = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    unexpected = [k for k in sd if k not in expected and k not in buffers and not k.endswith("position_ids")]
    if unexpected:
        raise CheckpointError(f"{path}: tensors the model does not have: {unexpected[:3]}; the checkpoint does "
                              "not match its config/factorization.json")
    for k, t in sd.items():
        if k in expected and tuple(expected[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: {k} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(expected[k].shape)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    model.tie_weights()
    loaded_ptrs = {t.data_ptr() for n, t in model.state_dict().items() if n in sd}
    missing = [k for k, t in model.state_dict().items()
               if k not in sd and k not in buffers and t.data_ptr() not in loaded_ptrs]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:3]}; the checkpoint is incomplete")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# ----------------------------------------------------------------------------- output check


def sample_inputs(config, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, Tensor]:
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise OptionError("the config has no vocab_size; cannot draw sample token ids")
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq = min(seq, int(max_pos)) if max_pos else seq
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def last_hidden(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out.hidden_states[-1]
    return h.float()


def compare_hidden(ref: Tensor, got: Tensor) -> dict:
    cos = nn.functional.cosine_similarity(ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]), dim=-1)
    return {"max_abs_diff": float((ref - got).abs().max()), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()), "ref_max_abs": float(ref.abs().max())}


def output_check(model_dir: str | Path, factored_dir: str | Path, *, batch: int = 2, seq: int = 16,
                 seed: int = 0) -> dict:
    """Last hidden state of the original vs the factorised model on seeded random token ids."""
    try:
        from transformers import AutoConfig

        config = _quiet_load(lambda: AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                                                trust_remote_code=False))
        cls = _hf_class(config)
        ref_model = _quiet_load(lambda: cls.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32))
        ref_model.eval()
        fac = load_factorized(factored_dir, dtype=torch.float32)
        inputs = sample_inputs(config, batch, seq, seed)
        res = compare_hidden(last_hidden(ref_model, inputs), last_hidden(fac, inputs))
    except SurgeryError:
        raise
    except Exception as e:  # noqa: BLE001 - the check is a report; a model we cannot run is noted, not fatal
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    res["inputs"] = f"{batch}x{seq} random token ids (seed {seed}), fp32"
    return res
