"""init-adapter: serial bottleneck adapters (Houlsby et al., 2019), SVD-initialised.

An adapter sits after a sub-layer's output projection (attention output / FFN
output, before the residual add and the norm) and maps its output h (dim d) to

    h + up(act(down(h)))        down: Linear(d, R), up: Linear(R, d)

Initialisation (`init_adapter`):
  svd (default)  down.weight = U_Rᵀ (R, d): the top-R left singular vectors of the
                 projection's weight W (d, k) — the directions its output h mostly
                 lies in, which is exactly the adapter's input. up = 0 and zero
                 biases, so the model's outputs are unchanged at initialisation,
                 and the first gradient step (on `up`) already sees the main
                 components of h.
  delta          from a fine-tune: the map X = Δ W⁺ (d, d) is the best linear
                 function of h reproducing the delta Δ = W_ft − W_base of that
                 projection (X W ≈ Δ, least squares). Its rank-R SVD gives
                 down = √S_R V_Rᵀ, up = U_R √S_R, and up.bias = Δb − X_R b cancels what
                 the adapter adds through the bias b of h and adds the bias delta.
                 With activation "identity" the adapted projection computes
                 (W + X_R W) x + b + Δb exactly; `captured` reports
                 1 − ‖Δ − X_R W‖²_F / ‖Δ‖²_F per module. With a non-linearity the
                 same weights pass through it, so the capture figure is that of the
                 linear bottleneck.

Sites (`placement`): "attn" = the attention output projection, "ffn" = the FFN
output projection, "both". Recognised names: BERT/RoBERTa (attention.output.dense,
layer.N.output.dense), Llama/Mistral/Qwen (self_attn.o_proj, mlp.down_proj), GPT-2
(attn.c_proj, mlp.c_proj, Conv1D), OPT/BART (out_proj, fc2), GPT-NeoX
(attention.dense, mlp.dense_4h_to_h); any other model takes `modules=REGEX`.

On-disk format (PEFT has no bottleneck adapters), a directory with
  bottleneck_config.json      {"format": "surgery-bottleneck", "format_version": 1,
                               "bottleneck": R, "activation": "gelu", "placement": "ffn",
                               "init": "svd" | "delta", "base_model_name_or_path": ...,
                               "modules": {"<module>": {"dim": d, "bottleneck": R, "site": "ffn"}}}
  bottleneck_model.safetensors  "<module>.down.weight" (R, d), "<module>.down.bias" (R,),
                                "<module>.up.weight" (d, R), "<module>.up.bias" (d,)
                                fp32, metadata {"format": "pt"}
where <module> is the output projection's name in the base model.

Python API::

    init_adapter(model, out, bottleneck=R, placement="ffn", from_delta=None, ...) -> BottleneckResult
    adapters = load_bottleneck(dir)                       # -> BottleneckSet
    handle = attach_bottleneck(hf_model, dir_or_set, freeze_base=False)
    handle.parameters() / handle.num_trainable()          # the adapters' parameters
    handle.remove()                                       # back to the original model
    save_bottleneck(handle, out_dir)                      # after training

`attach_bottleneck` registers each adapter as a child module named "bottleneck"
of its projection (so .to(), .parameters() and optimisers see it) and a forward
hook that replaces the projection's output by the adapter's; `remove()` undoes
both.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open
from torch import Tensor, nn

from surgery.core.hf import resolve_device, torch_threads
from surgery.core.layers import PROJECTION_KINDS, matrix_tensors, module_filter, module_of, open_model, oriented
from surgery.core.lowrank import lapack_threads, truncated_svd
from surgery.core.tensors import check_finite, check_fits, matrix_bytes
from surgery.errors import AdapterError, CheckpointError, OptionError
from surgery.io import CheckpointIndex, LazyReader, ShardedWriter, check_output_path, escape_name, load_json
from surgery.io.guards import check_regex, check_regular
from surgery.options.init import ACTIVATION_NAMES, PLACEMENTS, InitAdapterOptions

__all__ = ["InitAdapterOptions", "BottleneckAdapter", "BottleneckModule", "BottleneckResult", "BottleneckSet",
           "BottleneckHandle", "init_adapter", "load_bottleneck", "attach_bottleneck", "save_bottleneck", "sites",
           "delta_factors", "ACTIVATIONS", "PLACEMENTS"]

Progress = Callable[[str, int, int], None]
FORMAT = "surgery-bottleneck"
FORMAT_VERSION = 1
CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck_model.safetensors"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU, "identity": nn.Identity}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES  # the options object lists the same names, torch-free
CHILD = "bottleneck"

_SITES = {
    "attn": re.compile(r"(^|\.)(attention\.output\.dense|self_attn\.o_proj|self_attn\.out_proj|attn\.c_proj"
                       r"|attn\.out_proj|attn\.o_proj|attention\.dense|self_attention\.dense|attention\.o_proj)$"),
    "ffn": re.compile(r"(^|\.)(layers?\.\d+\.output\.dense|mlp\.down_proj|mlp\.c_proj|mlp\.fc2|fc2"
                      r"|mlp\.dense_4h_to_h|feed_forward\.w2|ffn\.lin2|mlp\.down|feed_forward\.down_proj)$"),
}


# ----------------------------------------------------------------------------- the module


class BottleneckAdapter(nn.Module):
    """h -> h + up(act(down(h))); 2·d·R + R + d parameters."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise OptionError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}",
                              field="activation")
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        self.activation = activation

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h)))


def sites(modules: Sequence[str], placement: str, pattern: str | None = None) -> dict[str, str]:
    """module -> site ("attn" | "ffn" | "custom") for the chosen placement.

    Args:
        modules: candidate module names (output projections are picked among them).
        placement: "ffn", "attn" or "both" (see _SITES for the names recognised).
        pattern: a regex naming the modules instead (site "custom").

    Raises:
        OptionError: unknown placement, or a pattern that is invalid or could backtrack for ever
            (surgery.io.guards.check_regex).

    Example:
        >>> sites(["l.0.self_attn.o_proj", "l.0.mlp.down_proj"], "attn")
        {'l.0.self_attn.o_proj': 'attn'}
    """
    if placement not in PLACEMENTS:
        raise OptionError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}", field="placement")
    if pattern is not None:
        try:
            rx = check_regex(pattern, "modules")
        except OptionError as e:
            raise OptionError(str(e), field="modules") from None
        return {m: "custom" for m in modules if rx.search(m)}
    want = ("attn", "ffn") if placement == "both" else (placement,)
    out = {}
    for m in modules:
        for s in want:
            if _SITES[s].search(m) and not (s == "ffn" and _SITES["attn"].search(m)):
                out[m] = s
                break
    return out


# ----------------------------------------------------------------------------- init


@dataclass
class BottleneckModule:
    module: str
    site: str
    dim: int
    bottleneck: int
    params: int
    top_energy: float  # share of ‖W‖²_F in the top-R left singular directions (svd init)
    captured: float | None = None  # delta init: 1 − ‖Δ − X_R W‖² / ‖Δ‖²


@dataclass
class BottleneckResult:
    out: Path
    bottleneck: int
    placement: str
    activation: str
    init: str
    modules: list[BottleneckModule]
    trainable_params: int = 0
    model_params: int = 0
    captured: float | None = None  # over all modules, energy-weighted
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def delta_factors(W: Tensor, b: Tensor | None, dW: Tensor, db: Tensor | None, R: int, *, rcond: float = 1e-5,
                  device: str | torch.device = "cpu") -> tuple[Tensor, Tensor, Tensor, float]:
    """down (R, d), up (d, R), up_bias (d,), captured, from W (d, k) and its delta dW (d, k).

    X = Δ W⁺ (d, d) is the least-squares solution of X W = Δ; its rank-R SVD gives
    down = √S_R V_Rᵀ, up = U_R √S_R; up_bias = Δb − X_R b.

    Args:
        W: the base projection's weight, oriented (out=d, in=k), fp32.
        b: its bias (d,) or None.
        dW: the fine-tune's delta of W (d, k); db: of the bias, or None.
        R: bottleneck width.
        rcond: singular values of W below rcond·σ₁ are cut in the pseudo-inverse.
        device: where the pseudo-inverse and the SVD run; results are CPU fp32.

    Returns:
        (down, up, up_bias, captured) with captured = 1 − ‖Δ − X_R W‖²_F / ‖Δ‖²_F.

    Example:
        >>> down, up, up_b, captured = delta_factors(W, b, W_ft - W, b_ft - b, 8)
    """
    d = W.shape[0]
    dev = resolve_device(device)
    with lapack_threads() if dev.type == "cpu" else contextlib.nullcontext():
        # X = Δ W⁺: least-squares solution of X W = Δ; small singular values of W cut at rcond
        X = dW.to(dev) @ torch.linalg.pinv(W.to(dev), rtol=rcond)  # (d, d)
    res = truncated_svd(X, R, method="exact" if min(X.shape) <= 1024 else "auto", device=dev)
    del X
    root = res.S.sqrt()  # (k,)
    down = torch.zeros(R, d)
    up = torch.zeros(d, R)
    down[: res.k] = root[:, None] * res.Vh  # (k, d)
    up[:, : res.k] = res.U * root  # (d, k)
    XR = up @ down  # (d, d)
    total = float(dW.double().pow(2).sum())
    err = float((dW - XR @ W).double().pow(2).sum())
    captured = 1.0 - err / total if total else 1.0
    up_bias = -(XR @ b) if b is not None else torch.zeros(d)  # (d,) cancels X_R applied to the bias of h
    if db is not None:
        up_bias = up_bias + db
    return down, up, up_bias, captured


@dataclass
class _Plan:
    """What init_adapter settles from headers alone, before reading any tensor."""

    idx: CheckpointIndex
    kinds: dict[str, str]  # projection module -> linear | conv1d
    chosen: dict[str, str]  # module -> site
    bidx: CheckpointIndex | None = None
    fidx: CheckpointIndex | None = None
    empty: list[str] = field(default_factory=list)  # selected projections with no elements: skipped


def init_adapter(
    model: str | Path,
    out: str | Path,
    options: InitAdapterOptions | None = None,
    *,
    progress: Progress | None = None,
    **fields,
) -> BottleneckResult:
    """Write bottleneck adapters for MODEL's chosen sub-layers to OUT (see the module docstring).

    Args:
        model: the model checkpoint (never modified).
        out: the adapter directory to write (atomically).
        options: an InitAdapterOptions; None builds one from FIELDS (bottleneck=..., ...).
        progress: called as progress("init-adapter", done, total) after each adapter.
        **fields: InitAdapterOptions fields, replacing those of `options`.

    Returns:
        A BottleneckResult: per adapter its site, size and (delta init) the share captured.

    Raises:
        OptionError: a bad option (naming its field), a bottleneck wider than a projection,
            a placement / pattern that selects nothing.
        CheckpointError: unreadable input, an adapter directory, MODEL / BASE / FT differing,
            NaN/Inf in a projection.
        OutputError: OUT exists (and overwrite is false) or lies inside an input.

    Example:
        >>> res = init_adapter("model/", "out/ad", bottleneck=16, placement="both")
        >>> res.trainable_params
    """
    t0 = time.perf_counter()
    opts = InitAdapterOptions.build(options, **fields)
    out = Path(out)
    inputs = [Path(model)] + [Path(p) for p in opts.from_delta or ()]
    check_output_path(out, opts.overwrite, inputs)
    device = resolve_device(opts.device)
    plan = _plan(model, opts)
    placement = "custom" if opts.modules else opts.placement
    result = BottleneckResult(out=out, bottleneck=cast(int, opts.bottleneck), placement=placement,
                              activation=opts.activation, init=opts.init, modules=[],
                              model_params=plan.idx.total_params)
    with torch_threads(opts.threads), ShardedWriter(out, shard_size=None, overwrite=opts.overwrite,
                                                    basename="bottleneck_model", inputs=inputs) as w:
        config_modules = _write_adapters(w, plan, opts, device, result, model, progress)
        w.write_json(CONFIG_NAME, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "bottleneck": opts.bottleneck,
            "activation": opts.activation, "placement": result.placement, "init": result.init,
            "base_model_name_or_path": str(model), "modules": config_modules,
        })
    result.seconds = time.perf_counter() - t0
    return result


def _plan(model: str | Path, opts: InitAdapterOptions) -> _Plan:
    """Open the checkpoints and choose the projections (headers only); every conflict settled."""
    R = cast(int, opts.bottleneck)  # required: validated by the options object
    idx = open_model(model, "MODEL")
    keep = module_filter(opts.include, opts.exclude)
    projs = {module_of(n): k for n, k in matrix_tensors(idx, allowed=PROJECTION_KINDS).items()}
    chosen = {m: s for m, s in sites(list(projs), opts.placement, opts.modules).items() if keep(m)}
    empty = sorted(m for m in chosen if min(idx.tensors[m + ".weight"].shape) == 0)
    chosen = {m: s for m, s in chosen.items() if m not in empty}
    if not chosen:
        how = f"modules {opts.modules!r}" if opts.modules else f"placement {opts.placement}"
        raise OptionError(f"{how} selects no non-empty output projection of {escape_name(model)}; name them with a "
                          "modules regex", field="modules" if opts.modules else "placement")
    for m in chosen:
        shape = idx.tensors[m + ".weight"].shape
        if R > min(shape):
            raise OptionError(f"bottleneck {R} exceeds min{tuple(shape)} = {min(shape)} for {escape_name(m, 200)}; "
                              f"use bottleneck <= {min(shape)}", field="bottleneck")
    plan = _Plan(idx, projs, chosen, empty=empty)
    if opts.from_delta:
        base, ft = (Path(p) for p in opts.from_delta)
        plan.bidx, plan.fidx = open_model(base, "BASE"), open_model(ft, "FT")
        for m in chosen:
            for name in (m + ".weight", m + ".bias"):
                shapes = [i.tensors[name].shape if name in i.tensors else None for i in (idx, plan.bidx, plan.fidx)]
                if len(set(shapes)) != 1:
                    raise CheckpointError(f"{escape_name(name, 200)}: shapes {shapes} in MODEL/BASE/FT differ; "
                                          "from_delta needs the same architecture")
    _check_memory(plan, R)
    return plan


def _check_memory(plan: _Plan, R: int) -> None:
    """Refuse, before the output is started, a projection whose adapter cannot be initialised in
    memory: the weight as read, its fp32 copy and top-R SVD factors; with from_delta, the base and
    fine-tuned weights, the delta and the (d, d) map X = Δ W⁺ with its full SVD."""
    def need(m: str) -> int:
        info = plan.idx.tensors[m + ".weight"]
        n = matrix_bytes(info.nbytes, info.shape, rank=R)
        if plan.fidx is not None:
            d = info.shape[1] if plan.kinds[m] == "conv1d" else info.shape[0]
            n += 2 * info.nbytes + matrix_bytes(0, info.shape, rank=min(info.shape), copies=2) + 4 * 3 * d * d
        return n

    m = max(plan.chosen, key=need)
    check_fits(need(m), f"initialising the adapter of {escape_name(m, 200)}",
               "use a machine with more memory, or exclude it (exclude)")


def _write_adapters(w: ShardedWriter, plan: _Plan, opts: InitAdapterOptions, device: torch.device,
                    result: BottleneckResult, model, progress: Progress | None) -> dict[str, dict]:
    """Initialise and write each adapter in shard order; returns the config's "modules"."""
    R = cast(int, opts.bottleneck)
    config_modules: dict[str, dict] = {}
    sq_err = sq_tot = 0.0
    with contextlib.ExitStack() as stack:
        r = stack.enter_context(LazyReader(plan.idx))
        rb = stack.enter_context(LazyReader(plan.bidx)) if plan.bidx else None
        rf = stack.enter_context(LazyReader(plan.fidx)) if plan.fidx else None
        order = r.order([m + ".weight" for m in plan.chosen])
        for i, name in enumerate(order):
            m = module_of(name)
            wt = r.get(name)
            check_finite(wt, name, model)
            W = oriented(wt, plan.kinds[m])  # (d, k)
            top = truncated_svd(W, R, method="exact" if min(W.shape) <= 1024 else "auto", name=name, device=device)
            if rb is not None and rf is not None:
                tensors, captured, tot = _from_delta(rb, rf, name, plan.kinds[m], plan.idx, R, device)
                sq_tot += tot
                sq_err += (1.0 - captured) * tot
            else:
                tensors, captured = _from_weight(top, W.shape[0], R), None
            for slot, t in zip(("down.weight", "down.bias", "up.weight", "up.bias"), tensors, strict=True):
                w.add(f"{m}.{slot}", t.float().contiguous())
            d = W.shape[0]
            params = 2 * d * R + R + d
            result.modules.append(BottleneckModule(m, plan.chosen[m], d, R, params, top.energy_kept(top.k), captured))
            result.trainable_params += params
            config_modules[m] = {"dim": d, "bottleneck": R, "site": plan.chosen[m]}
            if progress:
                progress("init-adapter", i + 1, len(order))
    result.notes += [f"skipped {escape_name(m, 200)}: empty projection {tuple(plan.idx.tensors[m + '.weight'].shape)}"
                     for m in plan.empty]
    if opts.from_delta:
        result.captured = 1.0 - sq_err / sq_tot if sq_tot else 1.0
        if opts.activation != "identity":
            result.notes.append(f"'captured' is for the linear bottleneck; with activation {opts.activation} the "
                                "same weights pass through the non-linearity (use identity for an exact start)")
    return config_modules


def _from_weight(top, d: int, R: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """svd init: down = the top-R left singular vectors of W (R, d), up and biases zero."""
    down_w = torch.zeros(R, d)
    down_w[: top.k] = top.U.T  # (k, d) top left singular vectors of W
    return down_w, torch.zeros(R), torch.zeros(d, R), torch.zeros(d)


def _from_delta(rb: LazyReader, rf: LazyReader, name: str, kind: str, idx: CheckpointIndex, R: int,
                device: torch.device) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], float, float]:
    """delta init of one projection: the four tensors, the share of ‖Δ‖² captured, and ‖Δ‖²."""
    m = module_of(name)
    Wb = oriented(rb.get(name), kind)  # (d, k)
    dW = oriented(rf.get(name), kind) - Wb  # (d, k)
    b = db = None
    if m + ".bias" in idx.tensors:
        b = rb.get(m + ".bias").float()  # (d,)
        db = rf.get(m + ".bias").float() - b  # (d,)
    down_w, up_w, up_b, captured = delta_factors(Wb, b, dW, db, R, device=device)
    return (down_w, torch.zeros(R), up_w, up_b), captured, float(dW.double().pow(2).sum())


# ----------------------------------------------------------------------------- load / attach


@dataclass
class BottleneckSet:
    config: dict
    adapters: dict[str, BottleneckAdapter]  # module name -> adapter


def _read_config(path: Path) -> tuple[Path, dict, str, dict]:
    """(config path, config, activation, modules) of a bottleneck adapter directory, checked."""
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterError(f"{escape_name(path)}: not a bottleneck adapter directory (needs {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME}); create one with `surgery init-adapter`")
    cfg = load_json(cfg_path, error=AdapterError)  # a FIFO, a JSON bomb, duplicate keys: one line
    where = escape_name(cfg_path)
    if cfg.get("format") != FORMAT:
        raise AdapterError(f"{where}: format is not {FORMAT!r}; this is not a surgery bottleneck adapter")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{where}: format_version {escape_name(repr(cfg.get('format_version')), 40)} is not "
                           f"supported (this surgery reads {FORMAT_VERSION}); upgrade surgery")
    act = cfg.get("activation")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise AdapterError(f"{where}: unknown activation {escape_name(repr(act), 40)}; use one of "
                           f"{', '.join(ACTIVATIONS)}")
    mods = cfg.get("modules")
    if not isinstance(mods, dict) or not mods:
        raise AdapterError(f"{where}: 'modules' must be a non-empty object")
    return cfg_path, cfg, act, mods


def _module_sizes(m: str, spec: object, cfg_path: Path) -> tuple[int, int]:
    """(dim, bottleneck) of one config entry: positive integers."""
    d = spec.get("dim") if isinstance(spec, dict) else None
    R = spec.get("bottleneck") if isinstance(spec, dict) else None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (d, R)):
        raise AdapterError(f"{escape_name(cfg_path)}: module '{escape_name(m, 200)}' needs positive integer 'dim' "
                           "and 'bottleneck'")
    return cast(int, d), cast(int, R)


def load_bottleneck(path: str | Path) -> BottleneckSet:
    """Read and validate a bottleneck adapter directory.

    Every tensor's shape is checked against its config entry before any module is built, so a
    config naming absurd sizes is refused in one line, not an allocation failure.

    Raises:
        AdapterError: a missing, malformed or mismatched config or weights file.

    Example:
        >>> aset = load_bottleneck("out/adapters")
        >>> sorted(aset.adapters)[:1]
        ['encoder.layer.0.output.dense']
    """
    path = Path(path)
    cfg_path, cfg, act, mods = _read_config(path)
    w_path = path / WEIGHTS_NAME
    check_regular(w_path, error=AdapterError)  # a FIFO would block safe_open
    try:
        with safe_open(str(w_path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{escape_name(w_path)}: cannot read ({escape_name(first, 200)}); re-create the "
                           "adapter") from None
    adapters = {}
    expected = set()
    for m, spec in mods.items():
        d, R = _module_sizes(m, spec, cfg_path)
        shapes = {"down.weight": (R, d), "down.bias": (R,), "up.weight": (d, R), "up.bias": (d,)}
        sd = {}
        for slot, shape in shapes.items():
            key = f"{m}.{slot}"
            expected.add(key)
            t = tensors.get(key)
            if t is None or tuple(t.shape) != shape:
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise AdapterError(f"{escape_name(w_path)}: {escape_name(key, 200)} is {got}, expected {shape}; the "
                                   "file does not match its config")
            sd[slot] = t.float()
        ad = BottleneckAdapter(d, R, act)
        ad.load_state_dict(sd)
        adapters[m] = ad
    extra = sorted(set(tensors) - expected)
    if extra:
        shown = ", ".join(escape_name(k, 200) for k in extra[:3])
        raise AdapterError(f"{escape_name(w_path)}: tensors not described by the config ({shown}); re-create the "
                           "adapter")
    return BottleneckSet(cfg, adapters)


class BottleneckHandle:
    """Adapters attached to a model; `remove()` restores the model."""

    def __init__(self, model: nn.Module, adapters: dict[str, BottleneckAdapter], config: dict, frozen: list):
        self.model = model
        self.adapters = adapters
        self.config = config
        self._hooks: list = []
        self._frozen = frozen  # parameters we set requires_grad=False on (restored by remove)

    def parameters(self):
        for a in self.adapters.values():
            yield from a.parameters()

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m in self.adapters:
            target = self.model.get_submodule(m)
            if CHILD in target._modules:
                del target._modules[CHILD]
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []


def _hook(module: nn.Module, args, output):
    return cast(nn.Module, module._modules[CHILD])(output)


def attach_bottleneck(model: nn.Module, adapters: str | Path | BottleneckSet, *,
                      freeze_base: bool = False) -> BottleneckHandle:
    """Insert the adapters after their projections in a loaded model (forward hooks).

    The adapters move to each projection's device and dtype. With freeze_base,
    every other parameter gets requires_grad=False (restored by remove())."""
    from transformers.pytorch_utils import Conv1D

    aset = adapters if isinstance(adapters, BottleneckSet) else load_bottleneck(adapters)
    targets = {}
    for m, ad in aset.adapters.items():
        try:
            target = model.get_submodule(m)
        except AttributeError:
            raise AdapterError(f"module '{escape_name(m, 200)}' of the adapter is not in the model; it was made "
                               "for another architecture (or the model has a different prefix)") from None
        if isinstance(target, nn.Linear):
            d = target.out_features
        elif isinstance(target, Conv1D):
            d = target.nf
        else:
            raise AdapterError(f"module '{escape_name(m, 200)}' is a {type(target).__name__}, not a Linear/Conv1D "
                               "projection")
        if d != ad.down.in_features:
            raise AdapterError(f"module '{escape_name(m, 200)}' outputs {d} features but its adapter expects "
                               f"{ad.down.in_features}")
        if CHILD in target._modules:
            raise AdapterError(f"module '{escape_name(m, 200)}' already has a bottleneck adapter; remove() the "
                               "first handle")
        targets[m] = target
    frozen = []
    if freeze_base:
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
    handle = BottleneckHandle(model, {}, aset.config, frozen)
    for m, target in targets.items():
        ad = aset.adapters[m].to(device=target.weight.device, dtype=target.weight.dtype)
        ad.requires_grad_(True)
        target.add_module(CHILD, ad)
        handle.adapters[m] = ad
        handle._hooks.append(target.register_forward_hook(_hook))
    return handle


def save_bottleneck(handle: BottleneckHandle | BottleneckSet, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write (trained) adapters back in the on-disk format, atomically."""
    config = dict(handle.config)
    adapters = handle.adapters
    with ShardedWriter(out, shard_size=None, overwrite=overwrite, basename="bottleneck_model") as w:
        for m in sorted(adapters):
            for k, t in adapters[m].state_dict().items():
                w.add(f"{m}.{k}", t.detach().float().cpu().contiguous())
        w.write_json(CONFIG_NAME, config)
    return Path(out)
