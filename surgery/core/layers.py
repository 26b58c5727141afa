"""What kind of layer each tensor of a checkpoint belongs to, and the helpers every
operation on layers shares.

The answer decides how a delta becomes LoRA factors: a Linear weight is (out, in),
a GPT-2 Conv1D weight is stored (in, out), an Embedding is (vocab, dim). We build
the architecture from config.json on the meta device (no memory, no data, no
remote code) and read the module types; without a usable config we fall back to
name heuristics.

Shared by the operations (extract, merge, analyze, init-lora, init-adapter, factorize):
`open_model`, `matrix_tensors`, `module_filter`, `check_includes_match`, `oriented`,
`tied_head`, `module_of`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from surgery.errors import CheckpointError, OptionError
from surgery.io import CheckpointIndex, open_checkpoint
from surgery.io.guards import check_regex

# kinds: "linear" (out, in) | "conv1d" (in, out) | "embedding" (vocab, dim)
#        "bias" (of a linear/conv1d) | "norm" (1-D params of a module with no 2-D weight)
#        "other" (anything else: buffers, int tensors, >2-D weights)
_EMB_NAME = re.compile(r"(embed|wte|wpe|embeddings)", re.I)
_NORM_NAME = re.compile(r"(norm|ln_|ln\d|layernorm)", re.I)

#: the kinds whose weight is a matrix SVD tools work on
MATRIX_KINDS = ("linear", "conv1d", "embedding")
#: the kinds whose weight is a projection (x -> W x): LoRA / factorisation targets
PROJECTION_KINDS = ("linear", "conv1d")


def _meta_model(config: dict) -> nn.Module | None:
    """The architecture of config.json built on the meta device, or None (custom code, unknown
    model type, any failure: the caller uses name heuristics)."""
    if config.get("auto_map"):
        return None  # custom code: we never run it; use heuristics
    try:
        from transformers import AutoConfig

        from surgery.core.hf import model_from_config, quiet

        with quiet(capture_stdio=True):
            cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            # architecture_class: only model classes transformers ships, never another attribute
            return model_from_config(cfg)
    except Exception:  # noqa: BLE001 - any failure means "use the heuristics"
        return None


def meta_model(config: dict) -> nn.Module | None:
    """The architecture named in config.json, built on the meta device (no memory, no data, no
    remote code), or None when transformers cannot build it."""
    return _meta_model(config)


def _from_model(model: nn.Module) -> dict[str, str]:
    from transformers.pytorch_utils import Conv1D

    kinds: dict[str, str] = {}
    for name, mod in model.named_modules():
        p = f"{name}." if name else ""
        if isinstance(mod, nn.Linear):
            kinds[p + "weight"], kinds[p + "bias"] = "linear", "bias"
        elif isinstance(mod, Conv1D):
            kinds[p + "weight"], kinds[p + "bias"] = "conv1d", "bias"
        elif isinstance(mod, nn.Embedding):
            kinds[p + "weight"] = "embedding"
        else:
            params = list(mod.named_parameters(recurse=False))
            if params and all(t.dim() == 1 for _, t in params):
                for n, _ in params:
                    kinds[p + n] = "norm"
    return kinds


def _heuristic(name: str, shape: tuple[int, ...], floating: bool) -> str:
    if not floating:
        return "other"
    if len(shape) == 2 and name.endswith(".weight"):
        return "embedding" if _EMB_NAME.search(name.rsplit(".", 2)[-2]) else "linear"
    if len(shape) == 1:
        return "norm" if _NORM_NAME.search(name) else "bias"
    return "other"


_ASSIGN = r"self\.(\w+)\s*(?::[^=]+)?=\s*{}\("


def _from_source(index: CheckpointIndex) -> dict[str, str] | None:
    """The same answer as the meta model, read from the architecture's modeling source
    text (no import: importing a transformers model class costs ~2 s of a 10 s
    extraction). Each 2-D weight's attribute must be assigned exactly one layer type
    there (`self.q_proj = nn.Linear(`...), else None and the caller builds the model."""
    cfg = index.config or {}
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or cfg.get("auto_map") or not re.fullmatch(r"[\w-]+", mt):
        return None
    import importlib.util

    spec = importlib.util.find_spec("transformers")  # where it is, without importing it (~0.9 s)
    if spec is None or not spec.origin:
        return None
    mt = mt.replace("-", "_")
    src = Path(spec.origin).parent / "models" / mt / f"modeling_{mt}.py"
    try:
        text = src.read_text(encoding="utf-8")
    except OSError:
        return None
    attrs = {kind: set(re.findall(_ASSIGN.format(pat), text))
             for kind, pat in (("linear", r"nn\.Linear"), ("conv1d", r"Conv1D"), ("embedding", r"nn\.Embedding"))}
    two_d: dict[str, str] = {}
    for n, t in index.tensors.items():
        if len(t.shape) != 2 or not t.dtype.is_floating_point or not n.endswith(".weight"):
            continue
        attr = n.rsplit(".", 2)[-2]
        hits = [k for k, names in attrs.items() if attr in names]
        if len(hits) != 1:
            return None  # unknown or ambiguous: let the real model decide
        two_d[n] = hits[0]
    out = dict(two_d)
    dims: dict[str, list[int]] = {}  # module -> ndim of each of its tensors
    for n, t in index.tensors.items():
        dims.setdefault(n.rsplit(".", 1)[0], []).append(len(t.shape))
    for n, t in index.tensors.items():
        if len(t.shape) == 1 and t.dtype.is_floating_point and n not in out:
            module = n.rsplit(".", 1)[0]
            if two_d.get(module + ".weight") in ("linear", "conv1d") and n.endswith(".bias"):
                out[n] = "bias"
            elif all(d == 1 for d in dims[module]):
                out[n] = "norm"  # like the meta model: a module whose parameters are all 1-D
            # else (Mamba's mixer.D, a Conv bias...): left to the heuristic, as the meta path does
    return out


def tensor_kinds(index: CheckpointIndex, fast: bool = True, names: Mapping[str, str] | None = None,
                 model: nn.Module | None = None) -> dict[str, str]:
    """tensor name -> kind, for every tensor of the checkpoint.

    `names` maps checkpoint names to the model's own (surgery.core.names.NameMap.to_module) when
    transformers renames them on load: the kind is then read from the module the tensor becomes
    (GPT-NeoX's ``embed_out`` is the Linear ``lm_head``), never from its checkpoint name. `model`
    is the architecture (meta device) when the caller has built it already."""
    rename = dict(names or {})
    renamed = any(k != v for k, v in rename.items())
    known = _from_source(index) if fast and index.config and not renamed and model is None else None
    if known is None:
        model = model if model is not None else _meta_model(index.config) if index.config else None
        known = _from_model(model) if model is not None else {}
    tensors = list(index.tensors)
    if known and sum(rename.get(n, n) in known for n in tensors) < 0.5 * len(tensors):
        known = {}  # names do not line up with the architecture (prefix differs): heuristics
    out = {}
    for n in tensors:
        t = index.tensors[n]
        k = known.get(rename.get(n, n))
        if k is None or not t.dtype.is_floating_point:
            k = _heuristic(n, t.shape, t.dtype.is_floating_point)
        if k in ("linear", "conv1d", "embedding") and len(t.shape) != 2:
            k = "other"
        out[n] = k
    return out


def module_filter(include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Callable[[str], bool]:
    """keep(module) for include / exclude regexes (re.search on the module name).

    Args:
        include: keep only modules matching one of these (none: keep all).
        exclude: then drop modules matching one of these.

    Returns:
        A predicate on module names; its `include` attribute holds the compiled include
        patterns (for `check_includes_match`).

    Raises:
        OptionError (field "include" / "exclude"): a pattern is not a valid regular expression,
        or one that could backtrack for ever (see surgery.options.patterns.check_regex).

    Example:
        >>> keep = module_filter(include=["attn"], exclude=["c_proj"])
        >>> keep("h.0.attn.c_attn"), keep("h.0.attn.c_proj"), keep("h.0.mlp.c_fc")
        (True, False, False)
    """
    inc, exc = _compiled(include, "include"), _compiled(exclude, "exclude")

    def keep(module: str) -> bool:
        if inc and not any(p.search(module) for p in inc):
            return False
        return not any(p.search(module) for p in exc)

    keep.include = inc  # type: ignore[attr-defined]
    return keep


def _compiled(patterns: Sequence[str], field: str) -> list[re.Pattern[str]]:
    """The patterns compiled, each refused (OptionError naming FIELD) if invalid or catastrophic."""
    try:
        return [check_regex(p, field) for p in patterns]
    except OptionError as e:
        raise OptionError(str(e), field=field) from None


def check_includes_match(keep: Callable[[str], bool], modules: Sequence[str], where: str | Path) -> None:
    """Each include pattern of `keep` must match at least one candidate module (else a typo).

    Raises:
        OptionError (field "include"): a pattern matches none of `modules`.

    Example:
        >>> check_includes_match(module_filter(["q_proj"]), ["l.0.q_proj", "l.0.k_proj"], "model/")
    """
    for p in getattr(keep, "include", []):
        if not any(p.search(m) for m in modules):
            raise OptionError(f"include pattern {p.pattern!r} matches no matrix module of {where}; check the "
                              "pattern", field="include")


def module_of(tensor: str) -> str:
    """The module a parameter belongs to: 'a.b.weight' -> 'a.b'."""
    return tensor.rsplit(".", 1)[0]


def open_model(path: str | Path, what: str) -> CheckpointIndex:
    """The index of a model checkpoint (headers only); an adapter directory is refused.

    Args:
        path: a checkpoint file or directory.
        what: how the message names this input ("MODEL", "BASE", ...).

    Raises:
        CheckpointError: unreadable, or an adapter directory where a model is expected.

    Example:
        >>> open_model("fixtures/tiny-bert", "MODEL").kind
        'model'
    """
    idx = open_checkpoint(path)
    if idx.kind != "model":
        raise CheckpointError(f"{idx.source or path}: {what} is an adapter directory; give a model checkpoint")
    return idx


def matrix_tensors(index: CheckpointIndex, kinds: dict[str, str] | None = None,
                   allowed: Sequence[str] = MATRIX_KINDS) -> dict[str, str]:
    """name -> kind for the 2-D floating `.weight` tensors of the allowed layer kinds, in file order.

    Args:
        index: the checkpoint's index.
        kinds: `tensor_kinds(index)` when the caller has it already.
        allowed: which kinds count (default Linear, Conv1D, Embedding).

    Example:
        >>> matrix_tensors(open_model("fixtures/tiny-gpt2", "MODEL"), allowed=PROJECTION_KINDS)
        {'transformer.h.0.attn.c_attn.weight': 'conv1d', ...}
    """
    kinds = tensor_kinds(index) if kinds is None else kinds
    return {
        n: k for n, k in kinds.items()
        if k in allowed and n.endswith(".weight") and len(index.tensors[n].shape) == 2
        and index.tensors[n].dtype.is_floating_point
    }


def oriented(t: Tensor, kind: str) -> Tensor:
    """The (out, in) fp32 matrix of a weight in storage layout (Conv1D stores (in, out)).

    Example:
        >>> oriented(torch.zeros(32, 96), "conv1d").shape
        torch.Size([96, 32])
    """
    t = t.float()
    return t.T if kind == "conv1d" else t


def tied_head(name: str, config: dict | None) -> bool:
    """An output head tied to the input embedding (loading re-ties it: its own changes are lost).

    transformers' default for `tie_word_embeddings` is true, so a config without it ties.

    Example:
        >>> tied_head("lm_head.weight", {"tie_word_embeddings": True})
        True
    """
    return name.endswith("lm_head.weight") and bool((config or {}).get("tie_word_embeddings", True))
