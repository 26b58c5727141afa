"""What kind of layer each tensor of a checkpoint belongs to.

The answer decides how a delta becomes LoRA factors: a Linear weight is (out, in),
a GPT-2 Conv1D weight is stored (in, out), an Embedding is (vocab, dim). We build
the architecture from config.json on the meta device (no memory, no data, no
remote code) and read the module types; without a usable config we fall back to
name heuristics.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from surgery.errors import OptionError
from surgery.io import CheckpointIndex

# kinds: "linear" (out, in) | "conv1d" (in, out) | "embedding" (vocab, dim)
#        "bias" (of a linear/conv1d) | "norm" (1-D params of a module with no 2-D weight)
#        "other" (anything else: buffers, int tensors, >2-D weights)
_EMB_NAME = re.compile(r"(embed|wte|wpe|embeddings)", re.I)
_NORM_NAME = re.compile(r"(norm|ln_|ln\d|layernorm)", re.I)


def _meta_model(config: dict) -> nn.Module | None:
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover
        return None
    if config.get("auto_map"):
        return None  # custom code: we never run it; use heuristics
    archs = config.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = None  # only model classes transformers ships, never an arbitrary attribute (pipeline, ...)
    try:
        cfg = AutoConfig.for_model(**config)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        with torch.device("meta"), contextlib.redirect_stderr(io.StringIO()):
            if cls is not None:
                return cls(cfg)
            return transformers.AutoModel.from_config(cfg)
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
    """keep(module) for --include / --exclude regexes (re.search on the module name)."""
    try:
        inc = [re.compile(p) for p in include]
        exc = [re.compile(p) for p in exclude]
    except re.error as e:
        raise OptionError(f"invalid --include/--exclude regex {e.pattern!r}: {e}") from None

    def keep(module: str) -> bool:
        if inc and not any(p.search(module) for p in inc):
            return False
        return not any(p.search(module) for p in exc)

    keep.include = inc  # type: ignore[attr-defined]
    return keep
