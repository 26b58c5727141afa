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

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from surgery.core.hf import (
    architecture_class,
    config_dict,
    load_pretrained,
    model_from_config,
    quiet,
    refuse_quantized,
    resolve_device,
    torch_threads,
)
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
from surgery.core.lowrank import SVDResult, lora_factors, truncated_svd
from surgery.core.tensors import check_finite, check_fits, matrix_bytes, require_finite
from surgery.errors import CheckpointError, OptionError, SurgeryError
from surgery.io import CheckpointIndex, LazyReader, ShardedWriter, escape_name, load_json, open_checkpoint, parse_size
from surgery.ops.analyze import spectrum
from surgery.options.factorize import FactorizeOptions
from surgery.report.cards import options_dict, write_card
from surgery.report.checks import capped_energy_warning, output_cosine_warning

__all__ = ["FactorizeOptions", "FactorizeResult", "FactorModule", "factorize", "load_factorized", "output_check",
           "factored_linear", "sample_inputs", "last_hidden", "compare_hidden", "savings"]

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
    warnings: list[str] = field(default_factory=list)  # the result is poor by its own measure (see _warnings)

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
    options: FactorizeOptions | None = None,
    *,
    progress: Progress | None = None,
    **fields,
) -> FactorizeResult:
    """Write a factorised copy of MODEL to OUT (see the module docstring).

    Args:
        model: the model checkpoint (a Hugging Face model directory for the output check).
        out: the output directory (written atomically).
        options: a FactorizeOptions; None builds one from FIELDS (rank=..., energy=..., ...).
        progress: called as progress("factorize", done, total) after each tensor.
        **fields: FactorizeOptions fields, replacing those of `options`.

    Returns:
        A FactorizeResult: per factorised module its rank, parameters and error; the modules
        kept dense and why; the output check (unless evaluate is false).

    Raises:
        OptionError: a bad option (naming its field), a pattern matching nothing, no module
            reaching min_savings (nothing is written).
        CheckpointError: unreadable input, an adapter directory, NaN/Inf in a selected weight.
        OutputError: OUT exists (and overwrite is false) or lies inside the input.

    Example:
        >>> res = factorize("model/", "out/fact", energy=0.95, include=["mlp"], min_savings=0.3)
        >>> res.params_saved, res.output_check["cosine_mean"]
    """
    t0 = time.perf_counter()
    opts = FactorizeOptions.build(options, **fields)
    shard_bytes = parse_size(opts.shard_size)
    device = resolve_device(opts.device)
    out = Path(out)
    idx = open_model(model, "MODEL")
    refuse_quantized(model, idx.config)  # its config would go into the output, which would not load
    result = FactorizeResult(out=out, modules=[], params_before=idx.total_params)
    targets = _targets(idx, opts, model, result.skipped)
    with torch_threads(opts.threads):
        with ShardedWriter(out, shard_size=shard_bytes, overwrite=opts.overwrite, inputs=[Path(model)]) as w, \
                LazyReader(idx) as r:
            meta = _FactorWriter(w, idx, targets, opts, device, result).run(r, progress)
            if not meta:
                raise OptionError(f"no module of {escape_name(model)} reaches min_savings {opts.min_savings} at the "
                                  f"chosen {opts.policy}; nothing was written", field="min_savings")
            w.copy_files(idx.root)
            w.write_json(META_NAME, {"format": FORMAT, "format_version": FORMAT_VERSION, "modules": meta})
        result.params_after = idx.total_params - sum(m.params_before - m.params_after for m in result.modules)
        if opts.evaluate:
            result.output_check = output_check(model, out)
    result.warnings = _warnings(result, opts)
    _card(result, opts, model)
    result.seconds = time.perf_counter() - t0
    return result


def _card(res: FactorizeResult, opts: FactorizeOptions, model: str | Path) -> None:
    """The output's model card (README.md, replacing any copied from MODEL), written after the output check."""
    oc = res.output_check or {}
    summary: dict[str, Any] = {
        "layers factorised": len(res.modules), "layers kept dense": len(res.skipped),
        "parameters": f"{res.params_before} -> {res.params_after} (saved "
                      f"{100 * res.params_saved / max(res.params_before, 1):.1f}%)",
        "largest relative error |W - BA| / |W|": round(max((m.rel_error for m in res.modules), default=0.0), 6),
        "smallest energy kept": f"{100 * min((m.energy_kept for m in res.modules), default=1.0):.2f}%",
    }
    if "cosine_mean" in oc:
        summary["output cosine to the original (mean / min)"] = f"{oc['cosine_mean']:.5f} / {oc['cosine_min']:.5f}"
    summary.update({f"warning {i + 1}": w.replace("`", "") for i, w in enumerate(res.warnings)})
    write_card(res.out, "factorize", str(model), options_dict(opts), summary, inputs=[model], tags=["low-rank"])


def _warnings(result: FactorizeResult, opts: FactorizeOptions) -> list[str]:
    """Energy targets cut short by max_rank; an output cosine to the original below 0.99."""
    policy = f"rank {opts.rank}" if opts.rank is not None else f"energy {opts.energy:g}"
    found = [capped_energy_warning([(m.module, m.rank, m.energy_kept) for m in result.modules], opts.energy,
                                   opts.max_rank if opts.rank is None else None, "layers"),
             output_cosine_warning(result.output_check, policy)]
    return [w for w in found if w]


def _targets(idx: CheckpointIndex, opts: FactorizeOptions, model, skipped: list[dict]) -> dict[str, str]:
    """tensor -> kind of the weights to factorise (headers only); the rest of the selection goes
    to `skipped` with why (a tied head; a fixed rank that cannot reach min_savings)."""
    keep = module_filter(opts.include, opts.exclude)
    cands = matrix_tensors(idx, allowed=PROJECTION_KINDS)
    check_includes_match(keep, [module_of(n) for n in cands], model)
    targets = {}
    for n, k in cands.items():
        module = module_of(n)
        if not keep(module):
            continue
        if tied_head(n, idx.config):
            skipped.append({"module": module, "why": "output head tied to the input embedding"})
            continue
        shape = idx.tensors[n].shape
        m, nn_ = (shape[1], shape[0]) if k == "conv1d" else shape
        if m * nn_ == 0:
            skipped.append({"module": module, "why": f"empty matrix {tuple(shape)}: nothing to factorise"})
            continue
        if opts.rank is not None and savings(min(opts.rank, m, nn_), m, nn_) < opts.min_savings:
            saved = 100 * savings(min(opts.rank, m, nn_), m, nn_)
            skipped.append({"module": module, "why": f"rank {opts.rank} saves {saved:.1f}% of {m}x{nn_} < "
                            f"min_savings {100 * opts.min_savings:g}%"})
            continue
        targets[n] = k
    if not targets:
        ms = opts.min_savings
        raise OptionError(f"no Linear/Conv1D weight of {escape_name(model)} would be factorised (see "
                          f"include/exclude, min_savings; e.g. rank r saves {100 * ms:g}% only when r <= "
                          f"{1 - ms:g}·out·in/(out+in))", field="min_savings")
    _check_memory(idx, targets, opts)
    return targets


def _check_memory(idx: CheckpointIndex, targets: dict[str, str], opts: FactorizeOptions) -> None:
    """Refuse, before the output is started, a weight whose factorisation cannot fit in memory:
    the tensor as read, its fp32 copy and the product B·A checked against it, the SVD's factors
    (the whole spectrum for the energy policy on an exact-sized matrix)."""
    def need(name: str) -> int:
        info = idx.tensors[name]
        mn = min(info.shape)
        rank = opts.rank if opts.rank is not None else (mn if mn <= 1024 else opts.max_rank)
        return matrix_bytes(info.nbytes, info.shape, rank=rank, copies=2)

    name = max(targets, key=need)
    check_fits(need(name), f"factorising {escape_name(name, 200)} {tuple(idx.tensors[name].shape)}",
               "use a machine with more memory, or exclude it (exclude)")


class _FactorWriter:
    """The streaming phase: every tensor in shard order, each target factorised or kept dense.

    Biases are small; one that comes before its weight in the file (sorted keys: ".bias" <
    ".weight") waits until the weight's SVD decides its name (X.bias or X.1.bias)."""

    def __init__(self, w: ShardedWriter, idx: CheckpointIndex, targets: dict[str, str], opts: FactorizeOptions,
                 device: torch.device, result: FactorizeResult):
        self.w, self.idx, self.targets, self.opts, self.device, self.result = w, idx, targets, opts, device, result
        self.biases = {module_of(n) + ".bias" for n in targets}
        self.pending: dict[str, Tensor] = {}
        self.decided: dict[str, bool] = {}  # module -> factorised?
        self.meta: dict[str, dict] = {}

    def run(self, r: LazyReader, progress: Progress | None) -> dict[str, dict]:
        """Write every tensor; returns factorization.json's "modules"."""
        order = r.order()
        for i, name in enumerate(order):
            t = r.get(name)
            module = module_of(name)
            if name in self.biases:
                if module in self.decided:
                    self._add_bias(module, t)
                else:
                    self.pending[module] = t
                continue
            if name not in self.targets:
                self.w.add(name, t)
                continue
            self._weight(name, module, t)
            if module in self.pending:
                self._add_bias(module, self.pending.pop(module))
            if progress:
                progress("factorize", i + 1, len(order))
        return self.meta

    def _add_bias(self, module: str, t: Tensor) -> None:
        self.w.add(module + (".1.bias" if self.decided[module] else ".bias"), t)

    def _weight(self, name: str, module: str, t: Tensor) -> None:
        kind = self.targets[name]
        check_finite(t, name, self.idx.source or self.idx.root)
        M = oriented(t, kind)  # (out, in)
        om, on = M.shape
        res, k = _svd_rank(M, name, self.opts, self.device)
        self.decided[module] = k > 0 and savings(k, om, on) >= self.opts.min_savings
        if not self.decided[module]:
            why = "zero matrix" if k == 0 else (
                f"rank {k} for {self.opts.energy} energy saves {100 * savings(k, om, on):.1f}% < min_savings "
                f"{100 * self.opts.min_savings:g}%")
            self.result.skipped.append({"module": module, "why": why})
            self.w.add(name, t)
            return
        A, B = lora_factors(res, k)  # (k, in), (out, k)
        A, B = A.to(t.dtype).contiguous(), B.to(t.dtype).contiguous()
        require_finite([(module + ".0.weight", A), (module + ".1.weight", B)], "the factors",
                       f"the factors overflow {t.dtype}; exclude this module")
        self.w.add(module + ".0.weight", A)
        self.w.add(module + ".1.weight", B)
        err = float((M - B.float() @ A.float()).norm())
        wn = float(M.norm())
        self.meta[module] = {"rank": k, "in_features": on, "out_features": om,
                             "bias": module + ".bias" in self.idx.tensors, "kind": kind}
        self.result.modules.append(FactorModule(module, kind, (om, on), k, om * on, k * (om + on),
                                                err / wn if wn else 0.0, res.energy_kept(k)))


def _svd_rank(M: Tensor, name: str, opts: FactorizeOptions, device: torch.device) -> tuple[SVDResult, int]:
    """The SVD of the (out, in) matrix M and the rank the policy picks (0 for a zero matrix)."""
    om, on = M.shape
    if opts.rank is not None:
        res = truncated_svd(M, min(opts.rank, om, on), method="auto", niter=opts.niter, seed=opts.seed, name=name,
                            device=device)
        return res, res.k
    res = spectrum(M, cap=opts.max_rank, niter=opts.niter, seed=opts.seed, name=name, device=device)
    energy = cast(float, opts.energy)  # one of rank / energy: validated by the options object
    return res, (max(1, res.rank_for_energy(energy)) if res.k else 0)


# ----------------------------------------------------------------------------- load


def factored_linear(in_features: int, out_features: int, rank: int, bias: bool) -> nn.Sequential:
    """x -> B (A x) + b: Linear(in, r, bias=False) then Linear(r, out, bias)."""
    return nn.Sequential(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))


def load_factorized(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model with the factorised layers of a `surgery factorize` output, in eval mode.

    Builds the architecture named in config.json (no remote code), swaps each module listed in
    factorization.json for `factored_linear`, and loads the checkpoint strictly: only tied
    weights and non-persistent buffers may be absent.

    Args:
        path: the output directory of `factorize`.
        dtype: cast the model to this dtype (default: as built, fp32).

    Raises:
        CheckpointError: factorization.json missing or malformed, config.json unreadable or
            needing custom code, tensors missing / extra / mis-shaped.

    Example:
        >>> model = load_factorized("out/fact")
        >>> model.get_submodule("encoder.layer.0.intermediate.dense")
        Sequential((0): Linear(in_features=384, out_features=128, bias=False), (1): Linear(...))
    """
    from transformers import AutoConfig

    path = Path(path)
    meta = _read_meta(path)
    idx = open_checkpoint(path)
    config_dict(path, idx.config)  # present, no custom code
    try:
        with quiet(capture_stdio=True):
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{escape_name(path)}: cannot read config.json ({escape_name(first, 200)})") from None
    cls = architecture_class(getattr(config, "architectures", None))
    model = model_from_config(config, cls)
    _swap_modules(model, meta.get("modules", {}), path / META_NAME, cls.__name__)
    with LazyReader(idx) as rd:
        sd = dict(rd.iter())
    _load_strict(model, sd, path)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _read_meta(path: Path) -> dict:
    """factorization.json, checked for its format and version and every entry's fields (the
    tool's strict JSON reader: a FIFO, a JSON bomb or a duplicate key is one line)."""
    meta_path = path / META_NAME
    meta = load_json(meta_path)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{escape_name(meta_path)}: not a {FORMAT} v{FORMAT_VERSION} file; re-run surgery "
                              "factorize")
    modules = meta.get("modules")
    if not isinstance(modules, dict):
        raise CheckpointError(f"{escape_name(meta_path)}: 'modules' must be an object; re-run surgery factorize")
    for name, spec in modules.items():
        _check_entry(name, spec, meta_path)
    return meta


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_entry(name: str, spec: Any, meta_path: Path) -> None:
    """One factorization.json entry: positive integer sizes, a rank within min(in, out), a boolean
    bias (a rank of 2^40 would otherwise be an allocation failure)."""
    ok = isinstance(spec, dict) and all(_positive_int(spec.get(k)) for k in ("rank", "in_features", "out_features"))
    ok = ok and isinstance(spec.get("bias"), bool)
    if not ok:
        raise CheckpointError(f"{escape_name(meta_path)}: module '{escape_name(name, 200)}' needs positive integer "
                              "rank / in_features / out_features and a boolean bias; re-run surgery factorize")
    r, n, m = spec["rank"], spec["in_features"], spec["out_features"]
    if r > min(n, m):
        raise CheckpointError(f"{escape_name(meta_path)}: module '{escape_name(name, 200)}' has rank {r} above "
                              f"min(in={n}, out={m}); re-run surgery factorize")


def _swap_modules(model: nn.Module, modules: dict, meta_path: Path, cls_name: str) -> None:
    """Replace each listed module of MODEL by the two-Linear Sequential its entry describes
    (entries checked by _read_meta); the module must be a Linear / Conv1D of those sizes."""
    for name, spec in modules.items():
        r, n, m, b = spec["rank"], spec["in_features"], spec["out_features"], spec["bias"]
        try:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except (AttributeError, TypeError, ValueError):
            raise CheckpointError(f"{escape_name(meta_path)}: module '{escape_name(name, 200)}' is not in "
                                  f"{cls_name}; re-run surgery factorize") from None
        w = getattr(old, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or sorted(w.shape) != sorted((n, m)):
            raise CheckpointError(f"{escape_name(meta_path)}: module '{escape_name(name, 200)}' of {cls_name} is not "
                                  f"a {m}x{n} projection; the file does not match config.json")
        setattr(parent, child, factored_linear(n, m, r, b))


def _load_strict(model: nn.Module, sd: dict[str, Tensor], path: Path) -> None:
    """Load SD into MODEL: no unexpected or mis-shaped tensor, nothing missing but tied weights."""
    expected = model.state_dict()
    buffers = {n for n, _ in model.named_buffers()}
    unexpected = [k for k in sd if k not in expected and k not in buffers and not k.endswith("position_ids")]
    if unexpected:
        shown = ", ".join(escape_name(k, 200) for k in unexpected[:3])
        raise CheckpointError(f"{escape_name(path)}: tensors the model does not have ({shown}); the checkpoint does "
                              "not match its config/factorization.json")
    for k, t in sd.items():
        if k in expected and tuple(expected[k].shape) != tuple(t.shape):
            raise CheckpointError(f"{escape_name(path)}: {escape_name(k, 200)} has shape {tuple(t.shape)}, the "
                                  f"model expects {tuple(expected[k].shape)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    cast(Any, model).tie_weights()  # a PreTrainedModel
    loaded_ptrs = {t.data_ptr() for n, t in model.state_dict().items() if n in sd}
    missing = [k for k, t in model.state_dict().items()
               if k not in sd and k not in buffers and t.data_ptr() not in loaded_ptrs]
    if missing:
        shown = ", ".join(escape_name(k, 200) for k in missing[:3])
        raise CheckpointError(f"{escape_name(path)}: missing tensors ({shown}); the checkpoint is incomplete")


# ----------------------------------------------------------------------------- output check


def sample_inputs(config, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, Tensor]:
    """Seeded random token ids (and an all-ones attention mask) for a transformers config."""
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise OptionError("the config has no vocab_size; cannot draw sample token ids")
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq = min(seq, int(max_pos)) if max_pos else seq
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def last_hidden(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """The model's last hidden state (fp32) on INPUTS, without gradients."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out.hidden_states[-1]
    return h.float()


def compare_hidden(ref: Tensor, got: Tensor) -> dict:
    """max abs diff and per-token cosine similarity (mean, min) of two hidden states."""
    cos = nn.functional.cosine_similarity(ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]), dim=-1)
    return {"max_abs_diff": float((ref - got).abs().max()), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()), "ref_max_abs": float(ref.abs().max())}


def output_check(model_dir: str | Path, factored_dir: str | Path, *, batch: int = 2, seq: int = 16,
                 seed: int = 0) -> dict:
    """Last hidden state of the original vs the factorised model on seeded random token ids.

    A model that cannot be run (or whose original cannot be loaded without transformers
    filling in weights) is noted as {"skipped": why}; a factorised output that does not load
    is a CheckpointError.

    Example:
        >>> output_check("model/", "out/fact")["cosine_mean"]
    """
    try:
        try:
            ref_model = load_pretrained(model_dir, dtype=torch.float32)
        except CheckpointError as e:
            return {"skipped": f"the original model does not load: {e}"}
        fac = load_factorized(factored_dir, dtype=torch.float32)
        inputs = sample_inputs(ref_model.config, batch, seq, seed)
        with quiet():
            res = compare_hidden(last_hidden(ref_model, inputs), last_hidden(fac, inputs))
    except SurgeryError:
        raise
    except Exception as e:  # noqa: BLE001 - the check is a report; a model we cannot run is noted, not fatal
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    res["inputs"] = f"{batch}x{seq} random token ids (seed {seed}), fp32"
    return res
