"""Checkpoint tensor names <-> the model's own parameter names, both ways.

transformers 5 loads some checkpoints under other names than the ones the model uses in memory
(and saves some models back under the old ones): ViT's ``encoder.layer.0.attention.attention.query``
is ``layers.0.attention.q_proj`` in memory, GPT-NeoX's ``embed_out`` is ``lm_head``, Mixtral's
per-expert ``block_sparse_moe.experts.3.w1.weight`` / ``w3`` are fused into one 3-D parameter
``mlp.experts.gate_up_proj``. PEFT keys adapters by the in-memory names, so everything that reads a
checkpoint and writes or reads an adapter goes through here.

The mapping is transformers' own (``conversion_mapping.get_model_conversion_mapping`` on the
architecture built on the meta device, applied with ``core_model_loading.rename_source_key``, the
function ``from_pretrained`` uses), never a table of ours.

API::

    nm = name_map(config, checkpoint_keys)       # NameMap; config is config.json as a dict
    nm.module_name("embed_out.weight")            # -> "lm_head.weight"
    nm.checkpoint_name("lm_head.weight")          # -> "embed_out.weight" (one-to-one names only)
    nm.fusions["model.layers.0.mlp.experts.gate_up_proj"]   # Fusion: sources, targets
    fusion.combine(get)                           # {target: tensor} from the checkpoint tensors
    nm.split({target: tensor})                    # {checkpoint name: tensor} (the reverse)
    nm.model                                      # the meta-device model (None on the fast path)
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from surgery.errors import CheckpointError

Getter = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Fusion:
    """Checkpoint tensors that transformers converts into other parameters on load (stacked
    experts, fused gate/up, split qkv...). `sources` are in the order transformers reads them."""

    targets: tuple[str, ...]  # parameter names in the model (a many-to-one fusion has one)
    sources: tuple[str, ...]  # checkpoint names
    patterns: tuple[str, ...]  # the converter's source pattern each source matched
    converter: Any = field(repr=False, compare=False)  # the transformers WeightConverter (template)
    model: Any = field(repr=False, compare=False)

    def combine(self, get: Getter) -> dict[str, torch.Tensor]:
        """The target parameters, built from the checkpoint tensors `get(name)` by transformers'
        own conversion operations. Raises CheckpointError when transformers cannot convert them."""
        conv = copy.deepcopy(self.converter)
        for src, pattern in zip(self.sources, self.patterns, strict=True):
            conv.add_tensor(self.targets[0], src, pattern, functools.partial(get, src))
        try:
            out = conv.convert(self.targets[0], model=self.model, config=getattr(self.model, "config", None))
        except Exception as e:  # noqa: BLE001 - transformers raises many types; one message
            raise CheckpointError(f"{self.targets[0]}: transformers cannot fuse {len(self.sources)} checkpoint "
                                  f"tensors ({self.sources[0]}, ...) into it ({e})") from None
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


@dataclass(frozen=True)
class NameMap:
    """Checkpoint name <-> parameter name of the model in memory.

    `to_module` maps every checkpoint name (a fusion's sources map to its first target);
    `to_checkpoint` inverts the one-to-one names; `fusions` holds the rest by target."""

    to_module: dict[str, str]
    to_checkpoint: dict[str, str]
    fusions: dict[str, Fusion] = field(default_factory=dict)
    model: Any = field(default=None, repr=False, compare=False)

    @property
    def identity(self) -> bool:
        """True when every checkpoint name is the model's own and nothing is fused."""
        return not self.fusions and all(k == v for k, v in self.to_module.items())

    def module_name(self, checkpoint_name: str) -> str:
        """The model's name for a checkpoint tensor (itself when unknown)."""
        return self.to_module.get(checkpoint_name, checkpoint_name)

    def checkpoint_name(self, module_name: str) -> str | None:
        """The checkpoint's name for a parameter of the model (a tensor name, or a module name:
        ``lm_head`` -> ``embed_out``); None for a fused parameter (see `split`) or an unknown one."""
        if module_name in self.to_checkpoint:
            return self.to_checkpoint[module_name]
        if module_name in self.fusions or any(module_name in f.targets for f in self.fusions.values()):
            return None
        for ck, mod in self.to_module.items():  # a module: map through any of its tensors
            if mod.startswith(module_name + ".") and self.to_checkpoint.get(mod) == ck:
                suffix = mod[len(module_name):]
                return ck[: -len(suffix)] if ck.endswith(suffix) else None
        return module_name if module_name in self.to_module else None

    def fusion_of(self, module_name: str) -> Fusion | None:
        """The fusion that produces parameter `module_name`, if any."""
        return next((f for f in self.fusions.values() if module_name in f.targets), None)

    def split(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters in the model's names -> the checkpoint tensors they come from (transformers'
        reverse conversion, as save_pretrained does). One-to-one names are renamed; fused
        parameters are split back (a stacked expert tensor into one tensor per expert).

        Raises CheckpointError for a parameter this map does not know, or a fusion that does not
        split back into its own checkpoint names."""
        out: dict[str, torch.Tensor] = {}
        fused: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if self.fusion_of(name) is not None:
                fused[name] = t
            elif name in self.to_checkpoint:
                out[self.to_checkpoint[name]] = t
            else:
                raise CheckpointError(f"{name}: not a parameter of this checkpoint's model")
        if fused:
            out.update(_revert(self, fused))
        return out


def _revert(nm: NameMap, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    back = revert_weight_conversion(nm.model, dict(fused))
    allowed = {s for t in fused for s in nm.fusion_of(t).sources}  # type: ignore[union-attr]
    stray = [k for k in back if k not in allowed]
    if stray:
        raise CheckpointError(f"{next(iter(fused))}: transformers splits it into {stray[0]!r}, which is not a "
                              "tensor of the checkpoint")
    return {k: (v[0] if isinstance(v, list) else v) for k, v in back.items()}


# ----------------------------------------------------------------------------- building


def _nested_configs(config: Mapping[str, Any]) -> bool:
    return any(isinstance(v, dict) and "model_type" in v for v in config.values())


def _needs_model(config: Mapping[str, Any]) -> bool:
    """Whether anything beyond transformers' unscoped "legacy" renames can apply (a mapping for
    the model type or class, or sub-models): only then is the architecture built."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    if _nested_configs(config):
        return True
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    base = MODEL_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None  # e.g. ViTModel inside
    keys = [a for a in archs if isinstance(a, str)] + [model_type, base]
    return any(isinstance(k, str) and get_checkpoint_conversion_mapping(k) is not None for k in keys)


@functools.lru_cache(maxsize=8)
def _meta_model_cached(config_json: str) -> Any:
    from surgery.core.layers import meta_model

    return meta_model(json.loads(config_json))


def _transforms(model: Any) -> tuple[list, list]:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    wc = get_model_conversion_mapping(model) if model is not None else get_checkpoint_conversion_mapping("legacy")
    return ([t for t in wc if isinstance(t, WeightRenaming)], [t for t in wc if isinstance(t, WeightConverter)])


def _forward(keys: list[str], model: Any) -> tuple[dict[str, str], dict[str, list[tuple[str, str]]], dict]:
    """transformers' loading rename of every key: one-to-one names, and fusion groups by target."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _transforms(model)
    prefix = getattr(model, "base_model_prefix", None) if model is not None else None
    meta_sd = {k: True for k in model.state_dict()} if model is not None else None
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    ones: dict[str, str] = {}
    groups: dict[str, list[tuple[str, str]]] = {}
    templates: dict[str, Any] = {}
    for key in keys:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if meta_sd is not None and renamed not in meta_sd and key in meta_sd:
            renamed, pattern = key, None  # as from_pretrained: a key the model has is kept
        if pattern is None:
            ones[key] = renamed if meta_sd is None or renamed in meta_sd else key
        else:
            groups.setdefault(renamed, []).append((key, pattern))
            templates.setdefault(renamed, by_pattern[pattern])
    return ones, groups, templates


def _fusion(target: str, members: list[tuple[str, str]], converter: Any, model: Any) -> Fusion:
    first = converter.target_patterns[0]
    head, _, tail = target.partition(first)
    targets = tuple(head + t + tail for t in converter.target_patterns) if first in target else (target,)
    return Fusion(targets, tuple(k for k, _ in members), tuple(p for _, p in members), copy.deepcopy(converter),
                  model)


def name_map(config: Mapping[str, Any] | None, keys: Iterable[str], *, model: Any = None) -> NameMap:
    """How transformers names each checkpoint tensor in memory, and back.

    Args:
        config: the checkpoint's config.json as a dict (None: names are taken as they are).
        keys: the checkpoint's tensor names.
        model: the architecture (any device); default: built on the meta device from `config`,
            and only when transformers has a conversion mapping for it (or sub-models).
    Returns:
        NameMap: `module_name` / `checkpoint_name` for one-to-one names, `fusions` for tensors
        that transformers fuses or splits, `split` for the reverse of a fused parameter.
    Raises:
        nothing for unknown architectures or custom code: the names are then taken as they are.

    Example:
        >>> nm = name_map(json.load(open("gpt-neox/config.json")), ["embed_out.weight", "gpt_neox.embed_in.weight"])
        >>> nm.module_name("embed_out.weight"), nm.checkpoint_name("lm_head")
        ('lm_head.weight', 'embed_out')
    """
    from transformers.core_model_loading import dot_natural_key

    keys = sorted(keys, key=dot_natural_key)
    if not config or config.get("auto_map"):
        return NameMap({k: k for k in keys}, {k: k for k in keys})
    if model is None and _needs_model(config):
        model = _meta_model_cached(json.dumps(config, sort_keys=True, default=str))
    ones, groups, templates = _forward(keys, model)
    fusions = {t: _fusion(t, m, templates[t], model) for t, m in groups.items()}
    to_module = dict(ones)
    for f in fusions.values():
        to_module.update({s: f.targets[0] for s in f.sources})
    inverse: dict[str, str] = {}
    for k, v in ones.items():
        inverse.setdefault(v, k)
    return NameMap(to_module, inverse, fusions, model)


__all__ = ["NameMap", "Fusion", "name_map"]
