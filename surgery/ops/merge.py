"""merge / unmerge: LoRA adapters folded into (or out of) a base checkpoint.

Math, replicated from PEFT 0.21.2 (tuners/lora/layer.py, variants.py, dora.py):

    Linear     Δ = transpose(B @ A, fan_in_fan_out) * scaling      (weight layout: (out, in), Conv1D (in, out))
    Embedding  Δ = (B @ A).T * scaling                             (weight (vocab, dim))
    bias       b' = b + lora_B.bias * scaling                      (lora_bias)
    DoRA       n = ‖transpose(W + Δ, fan_in_fan_out)‖ over dim 1   (per output row; per embedding *column*
               W' = (m / n) ⊙ (W + Δ)                              for embeddings), norm of the unmerged
                                                                   base plus the scaled delta, in fp32
    scaling    lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (per module via rank/alpha_pattern)

Numerics: everything is computed in fp32 (A, B, magnitude and the base weight are
upcast), then cast once to the output dtype, which is bit-identical to PEFT's
`merge_and_unload` for Linear / Conv1D / DoRA (its `weight.data += delta` with an
fp32 delta rounds once too). PEFT's Embedding merge rounds the delta to the weight
dtype before adding; we do the same there, so embeddings are bit-identical too.
(PEFT's unmerge also rounds the delta first; ours rounds once, which is closer.)

Several adapters: each adapter's change is scaled by its weight and the changes are
summed onto the base in one pass:  W' = W + Σ_k w_k (M_k(W) − W), which for plain
LoRA is W + Σ w_k Δ_k. For DoRA M_k(W) is the DoRA merge of adapter k alone on the
base (PEFT merging several DoRA adapters in turn would make the result depend on the
order). Full tensors (modules_to_save, embedding base layers) replace the base
tensor before the deltas are added (as PEFT loads them into the model first).

Unmerge subtracts Σ w_k Δ_k. DoRA is refused (the merged weight has the row norms
m; the norm ‖W + Δ‖ it was divided by is lost, so W cannot be recovered), and so are
full tensors (the base values they replaced are not in the adapter).

Tied embeddings: when the base stores only the input embedding and ties the output
head to it (tie_word_embeddings), PEFT's layers share one Parameter, so a LoRA on
the head (e.g. lm_head) or on the embedding changes both; we fold such deltas into
the one stored tensor and keep the tie, like PEFT + save_pretrained. A full
replacement of a tied head (modules_to_save=["lm_head"]) unties it: the head is
written as its own tensor and tie_word_embeddings is set to false.

Streaming: the base is read tensor by tensor in shard order (LazyReader.iter) and
written through ShardedWriter into a temporary sibling renamed into place at the
end; memory is one tensor in flight plus the adapters. Every check on keys,
patterns and shapes runs before the first byte is written.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from surgery.core.hf import DTYPE_NAMES, DTYPES, parse_dtype, resolve_device, torch_threads
from surgery.core.names import NameMap, name_map
from surgery.core.peft_format import LoraAdapterConfig, LoraModule, read_adapter, split_token_rows
from surgery.core.tensors import all_finite, count_non_finite
from surgery.errors import AdapterError, CheckpointError, OptionError, ValidationError
from surgery.io import CheckpointIndex, LazyReader, ShardedWriter, TensorInfo, check_output_path, open_checkpoint
from surgery.options.merge import MergeOptions

Progress = Callable[[str, int, int], None]

# transformers models whose projection layers are GPT-2 Conv1D (weight stored (in, out)).
# PEFT sets fan_in_fan_out from the module type, whatever the config says; so do we.
_CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
_CONV1D_NAMES = {"c_attn", "c_proj", "c_fc", "q_attn"}
# Tensors that follow the vocabulary size (a resized embedding resizes them all).
_VOCAB_TENSORS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "lm_head.weight",
                  "embed_in.weight", "embed_out.weight", "shared.weight")


# ----------------------------------------------------------------------------- results


@dataclass
class AdapterReport:
    path: str
    weight: float
    modules: int            # LoRA modules applied
    dora: bool
    rslora: bool
    replaced: list[str] = field(default_factory=list)  # full tensors written from the adapter


@dataclass
class MergeResult:
    """What `merge` wrote: per-adapter reports, the tensors it changed, shards and bytes, notes."""

    out: Path
    unmerge: bool
    adapters: list[AdapterReport]
    tensors: int             # tensors written
    changed: list[str]       # tensors whose values changed (merged or replaced)
    shards: int
    bytes: int
    dtype: str | None        # options.dtype, None = per-tensor base dtype
    vocab_size: int | None   # new vocab size when an adapter resized the embedding
    notes: list[str]
    seconds: float

    def to_json(self) -> dict:
        """A JSON-able dict: the fields, `out` as a string, plus `tensors_changed`."""
        d = asdict(self)
        d["out"] = str(self.out)
        d["tensors_changed"] = len(self.changed)
        return d


# ----------------------------------------------------------------------------- the plan
# Phases, each reading only what the earlier ones returned (headers and adapter tensors,
# never the base's values except to spot full tensors that restate it):
#   read adapters (_load_adapters)
#   -> match keys and patterns to the base's modules (_check_patterns, _module_target: PEFT's matching)
#   -> full-replacement ops (_replacements, _vocab_resize) and LoRA ops (_lora_ops)
#   -> plan shards (_default_shard_size, _planned_entries; see "on disk")


@dataclass
class _Op:
    """One adapter's action on one stored base tensor."""

    adapter: int
    kind: str                 # "lora" | "dora" | "bias" | "replace"
    weight: float
    module: LoraModule | None = None
    fifo: bool = False        # weight stored (in, out) (GPT-2 Conv1D); "param": an is_transposed expert stack
    tensor: torch.Tensor | None = None  # replacement ("replace"), saved rows ("rows")
    experts: int = 1          # "param": experts in the stack (1: a 2-D parameter)
    index: list[int] | None = None  # "rows": the token indices the saved rows replace

    def lora(self) -> LoraModule:
        """The module of a "lora" / "dora" / "bias" op (the plan always sets it for those)."""
        if self.module is None:
            raise TypeError(f"{self.kind} op without a LoRA module")
        return self.module

    def bias(self) -> torch.Tensor:
        """lora_B.bias of a "bias" op's module (the plan adds bias ops only where there is one)."""
        bias = self.lora().bias
        if bias is None:
            raise TypeError(f"{self.kind} op without a lora_B.bias")
        return bias

    def full(self) -> torch.Tensor:
        """The tensor of a "replace" op (the plan always sets it)."""
        if self.tensor is None:
            raise TypeError(f"{self.kind} op without a tensor")
        return self.tensor


@dataclass
class _Base:
    """What the plan needs to know about the base: names, shapes, dtypes, ties, config."""

    where: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    tied: dict[str, str]      # head name (not stored) -> stored source name
    config: dict | None
    read: Callable[[str], torch.Tensor] | None = None  # stored tensor by name (for equality checks)
    names: NameMap | None = None  # checkpoint names <-> the model's (None: the same)

    def checkpoint_name(self, name: str) -> str:
        """The stored name of a tensor named as in the model in memory (PEFT's names): ViT's
        ``layers.0.attention.q_proj.weight`` is ``encoder.layer.0.attention.attention.query.weight`` on
        disk. Itself when the names agree, or for a fused parameter (see `fusion_of`)."""
        if self.names is None or self.names.identity:
            return name
        return self.names.checkpoint_name(name) or name

    def same_as_stored(self, name: str, t: torch.Tensor) -> bool:
        """A full tensor that only restates the base (PEFT saves embedding base layers) is a no-op."""
        src = self.tied.get(name, name)
        if self.read is None or src not in self.shapes or tuple(t.shape) != self.shapes[src]:
            return False
        return torch.equal(self.read(src), t.to(self.dtypes[src]))

    def modules(self) -> set[str]:
        """Every module name of the model in memory (what target_modules and patterns match)."""
        out: set[str] = set()
        names = [*self.shapes, *self.tied]
        if self.names is not None and not self.names.identity:
            names = [self.names.module_name(n) for n in names]
        for name in names:
            parts = name.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts)))
        return out


@dataclass
class _Adapter:
    path: str
    config: LoraAdapterConfig
    modules: dict[str, LoraModule]
    full: dict[str, torch.Tensor]
    weight: float
    origin: dict[str, str] = field(default_factory=dict)  # stored module name -> PEFT's (where they differ)
    params: dict[str, LoraModule] = field(default_factory=dict)  # target_parameters: PEFT module key -> LoRA
    tokens: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)  # module -> (ids, rows)

    def peft_name(self, module: str) -> str:
        """The module name PEFT keys this adapter by (the model's in-memory name)."""
        return self.origin.get(module, module)


@dataclass
class _Plan:
    base: _Base
    adapters: list[_Adapter]
    ops: dict[str, list[_Op]]           # stored tensor name -> ops
    extra: dict[str, list[_Op]]         # new tensors (an untied head) -> ops (a replace)
    new_shapes: dict[str, tuple[int, ...]]
    config_updates: dict
    notes: list[str]
    unmerge: bool
    dtype: torch.dtype | None
    device: torch.device
    applied: list[set[str]]             # per adapter: modules applied
    fused: dict[str, str] = field(default_factory=dict)  # stored source -> fused parameter the ops change


@dataclass
class _Replacements:
    """The full-tensor phase's output: what the adapters' whole tensors do to the base."""

    adapters: list[_Adapter]            # as given, less the full tensors that only restate the base
    ops: dict[str, list[_Op]] = field(default_factory=dict)
    extra: dict[str, list[_Op]] = field(default_factory=dict)
    new_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    config_updates: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    applied: list[set[str]] = field(default_factory=list)
    restored: set[str] = field(default_factory=set)  # unmerge: tensors restored whole from a saved original


@dataclass
class _LoraOps:
    """The LoRA phase's output: (stored tensor, op) in application order, notes, modules applied."""

    placed: list[tuple[str, _Op]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    applied: list[set[str]] = field(default_factory=list)


# ------------------------------------------- matching adapter keys and patterns to base modules


def _is_conv1d(base: _Base, module: str) -> bool | None:
    if not base.config:
        return None
    mt = base.config.get("model_type")
    return mt in _CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in _CONV1D_NAMES


def _pattern_hits(key: str, modules: set[str]) -> bool:
    rx = re.compile(rf"(.*\.)?({key})$")
    return any(rx.match(m) for m in modules)


def _target_hits(entry: str, modules: set[str]) -> bool:
    return any(m == entry or m.endswith("." + entry) for m in modules)


def _check_patterns(ad: _Adapter, base: _Base, modules: set[str]) -> list[str]:
    """Notes for rank/alpha pattern keys and target_modules entries that match no base module.

    PEFT merges such adapters (it ignores what matches nothing), so they are not refused; saved
    tensor keys that fit no module are still refused (read_adapter, _module_target)."""
    cfg, notes = ad.config, []
    for key in ("rank_pattern", "alpha_pattern"):
        notes += [f"{ad.path}: {key} key {k!r} matches no module of the base; ignored (as PEFT does)"
                  for k in getattr(cfg, key) if not _pattern_hits(k, modules)]
    tm = cfg.target_modules
    if isinstance(tm, list):
        notes += [f"{ad.path}: target_modules entry {e!r} matches no module of the base; ignored (as PEFT does)"
                  for e in tm if not _target_hits(e, modules)]
    elif isinstance(tm, str) and tm != "all-linear" and not any(re.fullmatch(tm, m) for m in modules):
        notes.append(f"{ad.path}: target_modules regex {tm!r} matches no module of the base; is the adapter "
                     f"for another model?")
    return notes


def _missing_hint(name: str, base: _Base) -> str:
    close = [n for n in base.shapes if n.endswith("." + name) or name.endswith("." + n)]
    if close:
        return (f"; the base has {close[0]!r}: was the adapter trained on another head/wrapper "
                f"(different name prefix)?")
    return "; is the adapter for another model?"


def _resolve(name: str, base: _Base) -> str | None:
    """Stored tensor that `name` lives in (a tied head lives in its source)."""
    if name in base.shapes:
        return name
    return base.tied.get(name)


# ----------------------------------------------------------------------- full-replacement ops


def _drop_restated(ad: _Adapter, base: _Base, notes: list[str]) -> _Adapter:
    """The adapter without the full tensors that equal the base (a note says which)."""
    same = {n for n, t in ad.full.items() if base.same_as_stored(n, t)}
    if not same:
        return ad
    notes.append(f"{ad.path}: {', '.join(sorted(same))} equal the base (saved by PEFT beside a targeted "
                 f"embedding/head); nothing to replace")
    return replace(ad, full={n: t for n, t in ad.full.items() if n not in same})


def _resized_shape(ad: _Adapter, name: str, t: torch.Tensor, old: tuple[int, ...]) -> tuple[int, ...] | None:
    """The new shape when full tensor `name` resizes the vocabulary, None when it keeps the base's."""
    if tuple(t.shape) == old:
        return None
    if not (name.endswith(_VOCAB_TENSORS) and len(old) == 2 and tuple(t.shape[1:]) == old[1:]):
        raise AdapterError(
            f"{ad.path}: full tensor {name!r} has shape {tuple(t.shape)} but the base has {old}; "
            f"is the adapter for another model?"
        )
    if ad.weight != 1.0:
        raise OptionError(f"{ad.path}: resizes {name} to {tuple(t.shape)}; a resized tensor cannot be "
                          f"scaled, use weight 1", field="weights")
    return tuple(t.shape)


def _place_full(i: int, ad: _Adapter, name: str, t: torch.Tensor, base: _Base, rep: _Replacements) -> None:
    """One full tensor of adapter i: a replace op on the stored tensor, or an untied head."""
    op = _Op(i, "replace", ad.weight, tensor=t)
    if not t.is_floating_point():
        raise AdapterError(f"{ad.path}: full tensor {name!r} has dtype {t.dtype}; expected floating point")
    if name in base.shapes:
        shape = _resized_shape(ad, name, t, base.shapes[name])
        if shape is not None:
            rep.new_shapes[name] = shape
        rep.ops.setdefault(name, []).append(op)
        _untie_heads(ad, name, base, rep)
    elif name in base.tied:
        # The head gets its own trained copy: untie it (see module docstring).
        if ad.weight != 1.0:
            raise OptionError(f"{ad.path}: replaces tied {name}; it cannot be scaled, use weight 1", field="weights")
        if rep.extra.get(name):
            raise AdapterError(f"{name}: replaced by two adapters (modules_to_save); merge them separately")
        rep.extra[name] = [op]
        rep.config_updates["tie_word_embeddings"] = False
        rep.notes.append(f"{name} was tied to {base.tied[name]}; {ad.path} replaces it, so it is written "
                         f"untied (tie_word_embeddings=false)")
    else:
        raise AdapterError(
            f"{ad.path}: full tensor {name!r} (modules_to_save) matches no tensor of the base {base.where}"
            + _missing_hint(name, base)
        )


def _untie_heads(ad: _Adapter, name: str, base: _Base, rep: _Replacements) -> None:
    """A full replacement of a tied input embedding: PEFT wraps only the embedding (modules_to_save),
    so the heads tied to it keep the base values (untied), unless ensure_weight_tying keeps the tie."""
    heads = [h for h, src in base.tied.items() if src == name]
    if not heads:
        return
    if ad.config.raw.get("ensure_weight_tying") is True:
        rep.notes.append(f"{ad.path}: replaces {name}; ensure_weight_tying keeps {', '.join(heads)} tied to it")
        return
    for head in heads:
        rep.extra.setdefault(head, [])  # [] = a copy of the base's (unreplaced) source tensor
        rep.config_updates["tie_word_embeddings"] = False
        rep.notes.append(f"{head} was tied to {name}; {ad.path} replaces {name} only (modules_to_save), so "
                         f"{head} keeps the base values and is written untied (tie_word_embeddings=false), like PEFT")


def _restore_originals(i: int, ad: _Adapter, base: _Base, rep: _Replacements) -> None:
    """Unmerge: full tensors can only be undone when they are provably the base's original values.

    That holds for the base layer of a module the adapter puts LoRA on (`<module>.weight`, saved by
    PEFT beside a targeted embedding / tied head: frozen, never trained): the stored tensor is
    restored from it (and the LoRA deltas on it are not subtracted). Anything else (modules_to_save,
    bias="all" biases, a resized vocabulary) was trained and the base values are not in the adapter."""
    for name, t in ad.full.items():
        if name.removesuffix(".weight") not in ad.modules or not name.endswith(".weight"):
            raise AdapterError(
                f"{ad.path}: stores trained full tensor {name} (modules_to_save / bias=\"all\"); the base values "
                f"it replaced are not in the adapter, so unmerge cannot restore them; merge from the original base"
            )
        target = _resolve(name, base)
        if target is None or tuple(t.shape) != base.shapes[target]:
            raise AdapterError(f"{ad.path}: saved base layer {name} {tuple(t.shape)} does not fit the base "
                               f"{base.where}; is the adapter for another model?")
        prev = rep.ops.get(target)
        if prev and not torch.equal(prev[0].full(), t):
            raise AdapterError(f"{target}: adapters save different original values for it; unmerge them separately")
        if not prev:
            rep.ops[target] = [_Op(i, "replace", 1.0, tensor=t)]
            rep.restored.add(target)
            rep.notes.append(f"{target} restored from the original saved in {ad.path} (its LoRA deltas are not "
                             f"subtracted)")
    rep.applied.append({name.rsplit(".", 1)[0] for name in ad.full})


def _vocab_resize(base: _Base, new_shapes: dict[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
    """Config updates and notes for a resized vocabulary, which must resize every vocab-sized tensor."""
    if not new_shapes:
        return {}, []
    sizes = {s[0] for s in new_shapes.values()}
    if len(sizes) != 1:
        raise AdapterError(f"adapters resize the vocabulary inconsistently: {new_shapes}; resize all to one size")
    vocab = sizes.pop()
    old_vocab = next(base.shapes[n][0] for n in new_shapes)
    for name, shape in base.shapes.items():
        if name.endswith(_VOCAB_TENSORS) and shape and shape[0] == old_vocab and name not in new_shapes:
            raise AdapterError(
                f"the adapter resizes the vocabulary to {vocab} but {name} keeps {old_vocab} rows "
                f"and is not in modules_to_save; the merged model would not load"
            )
    cfg = base.config or {}
    updates = {}
    if "vocab_size" in cfg:
        updates["vocab_size"] = vocab
    elif isinstance(cfg.get("text_config"), dict) and "vocab_size" in cfg["text_config"]:
        updates["text_config.vocab_size"] = vocab
    return updates, [f"vocabulary resized {old_vocab} -> {vocab} (config.json vocab_size updated)"]


def _replacements(base: _Base, adapters: list[_Adapter], unmerge: bool) -> _Replacements:
    """Phase: the adapters' full tensors (modules_to_save, resized embeddings) as replace ops.

    Runs before the LoRA phase: deltas are checked against the replaced shapes."""
    rep = _Replacements(adapters=[])
    replaced_by: dict[str, str] = {}
    for i, given in enumerate(adapters):
        if unmerge:
            rep.adapters.append(given)
            _restore_originals(i, given, base, rep)
            continue
        ad = _drop_restated(given, base, rep.notes)
        rep.adapters.append(ad)
        for name, t in ad.full.items():
            if name in replaced_by:
                raise AdapterError(f"{name}: replaced by both {replaced_by[name]} and {ad.path} (modules_to_save); "
                                   f"merge them separately")
            replaced_by[name] = ad.path
            _place_full(i, ad, name, t, base, rep)
        rep.applied.append({name.rsplit(".", 1)[0] for name in ad.full})
    updates, notes = _vocab_resize(base, rep.new_shapes)
    rep.config_updates.update(updates)
    rep.notes.extend(notes)
    return rep


# ----------------------------------------------------------------------------------- LoRA ops


def _module_target(ad: _Adapter, mname: str, base: _Base, rep: _Replacements) -> tuple[str, list[str]]:
    """The stored base tensor a LoRA module's delta lands in (a tied head's lands in its source)."""
    wname = f"{mname}.weight"
    target = _resolve(wname, base)
    if target is None:
        raise AdapterError(
            f"{ad.path}: LoRA module {mname!r} has no weight {wname!r} in the base {base.where}"
            + _missing_hint(wname, base)
        )
    notes = []
    if ad.config.targets(ad.peft_name(mname)) is False and wname not in base.tied:  # accepted only as a tied head
        raise AdapterError(f"{ad.path}: LoRA module {mname!r} is not matched by target_modules and is not an "
                           f"output head tied to the embedding (ensure_weight_tying); PEFT would ignore its weights")
    if target != wname:
        notes.append(f"{wname} is tied to {target}: {ad.path}'s delta on {mname} changes the shared tensor "
                     f"(as in PEFT, where both modules share one parameter)")
    if target in rep.extra or wname in rep.extra:
        raise AdapterError(f"{ad.path}: {mname} has a LoRA delta but {wname} is replaced (modules_to_save)")
    dt = base.dtypes[target]
    if not dt.is_floating_point:
        raise AdapterError(f"{ad.path}: {mname}: base weight {target} has dtype {dt}; cannot add a LoRA delta")
    return target, notes


def _factor_layout(ad: _Adapter, m: LoraModule, target: str, shape: tuple[int, ...],
                   base: _Base) -> tuple[bool, int, list[str]]:
    """(fan_in_fan_out, out dim, notes) of LoRA module m on base weight `target` of `shape`,
    after checking that A, B (and the DoRA magnitude) fit it."""
    mname, cfg, notes = m.module, ad.config, []
    r = m.A.shape[0]
    if m.kind == "linear" and m.A.dim() > 2 and len(shape) == m.A.dim():  # Conv1d/2d/3d
        want_a, want_b = (r, *shape[1:]), (shape[0], r, *([1] * (len(shape) - 2)))
        if m.magnitude is not None:
            raise AdapterError(f"{ad.path}: {mname}: DoRA on convolutions is not supported; merge it with PEFT")
        fifo, out_dim = False, shape[0]
    elif len(shape) != 2:
        raise AdapterError(
            f"{ad.path}: {mname}: base weight {target} has shape {shape} but A is {tuple(m.A.shape)}; only "
            f"Linear, Conv1D, Embedding and Conv1d/2d/3d LoRA can be merged"
        )
    elif m.kind == "embedding":
        fifo, out_dim = False, shape[1]
        want_a, want_b = (r, shape[0]), (shape[1], r)
    else:
        conv1d = _is_conv1d(base, mname)
        fifo = cfg.fan_in_fan_out if conv1d is None else conv1d
        if conv1d is not None and conv1d != cfg.fan_in_fan_out:
            notes.append(f"{ad.path}: fan_in_fan_out={cfg.fan_in_fan_out} ignored for {mname}: it is a "
                         f"{'Conv1D' if conv1d else 'Linear'} layer (PEFT overrides it the same way)")
        out_dim, in_dim = (shape[1], shape[0]) if fifo else shape
        want_a, want_b = (r, in_dim), (out_dim, r)
    if tuple(m.A.shape) != want_a or tuple(m.B.shape) != want_b:
        raise AdapterError(
            f"{ad.path}: {mname}: shape mismatch: A {tuple(m.A.shape)} / B {tuple(m.B.shape)} do not fit "
            f"the base weight {target} {shape} (expected A {want_a}, B {want_b}"
            f"{', fan_in_fan_out' if fifo else ''}); is the adapter for another model?"
        )
    if m.magnitude is not None and tuple(m.magnitude.shape) != (out_dim,):
        raise AdapterError(
            f"{ad.path}: {mname}: lora_magnitude_vector has shape {tuple(m.magnitude.shape)}, expected ({out_dim},)"
        )
    return fifo, out_dim, notes


def _bias_target(ad: _Adapter, m: LoraModule, base: _Base, out_dim: int) -> str | None:
    """The base bias a lora_B.bias adds to; None when there is no bias delta (or only zeros)."""
    if m.bias is None:
        return None
    bname = f"{m.module}.bias"
    if bname not in base.shapes:
        if bool((m.bias == 0).all()):  # explicit zeros: nothing to add
            return None
        raise AdapterError(
            f"{ad.path}: {m.module} has a non-zero lora_B.bias but the base layer has no bias "
            f"{bname!r}; PEFT cannot merge it either"
        )
    if base.shapes[bname] != (out_dim,):
        raise AdapterError(
            f"{ad.path}: {m.module}: lora_B.bias {tuple(m.bias.shape)} does not fit base {bname} {base.shapes[bname]}"
        )
    return bname


def _module_ops(i: int, ad: _Adapter, m: LoraModule, base: _Base,
                rep: _Replacements) -> tuple[list[tuple[str, _Op]], list[str]]:
    """Adapter i's ops for one LoRA module: the delta (LoRA or DoRA) on its weight, then its bias."""
    target, notes = _module_target(ad, m.module, base, rep)
    shape = rep.new_shapes.get(target, base.shapes[target])
    fifo, out_dim, layout_notes = _factor_layout(ad, m, target, shape, base)
    kind = "dora" if m.magnitude is not None else "lora"
    placed = [] if target in rep.restored else [(target, _Op(i, kind, ad.weight, module=m, fifo=fifo))]
    bias = _bias_target(ad, m, base, out_dim)
    if bias is not None:
        placed.append((bias, _Op(i, "bias", ad.weight, module=m)))
    return placed, notes + layout_notes


def _lora_ops(base: _Base, rep: _Replacements, unmerge: bool) -> _LoraOps:
    """Phase: every adapter's LoRA modules matched to base weights, as ops in application order."""
    modules = base.modules()
    out = _LoraOps()
    for i, ad in enumerate(rep.adapters):
        out.notes.extend(_check_patterns(ad, base, modules))
        if unmerge and ad.config.use_dora:
            raise AdapterError(
                f"{ad.path}: DoRA merges cannot be undone from the merged weights (the norm ‖W+ΔW‖ that scaled "
                f"each row is lost); merge from the original base instead of unmerging"
            )
        for m in ad.modules.values():
            placed, notes = _module_ops(i, ad, m, base, rep)
            out.placed.extend(placed)
            out.notes.extend(notes)
        out.applied.append(set(ad.modules))
    return out


def _in_checkpoint_names(ad: _Adapter, base: _Base) -> _Adapter:
    """The adapter with its modules and full tensors renamed from PEFT's (in-memory) names to the
    base checkpoint's stored names, so that the merged model keeps the names it was saved with."""
    if base.names is None or base.names.identity:
        return ad
    modules: dict[str, LoraModule] = {}
    origin: dict[str, str] = {}
    for name, m in ad.modules.items():
        stored = base.checkpoint_name(f"{name}.weight").removesuffix(".weight")
        modules[stored] = replace(m, module=stored) if stored != name else m
        if stored != name:
            origin[stored] = name
    full = {base.checkpoint_name(n): t for n, t in ad.full.items()}
    return replace(ad, modules=modules, full=full, origin=origin)


def _build_plan(
    base: _Base,
    adapters: list[_Adapter],
    *,
    unmerge: bool,
    dtype: torch.dtype | None,
    device: torch.device,
) -> _Plan:
    """Every check on keys, patterns and shapes, from headers and adapter tensors; nothing written."""
    adapters = [_in_checkpoint_names(ad, base) for ad in adapters]
    rep = _replacements(base, adapters, unmerge)
    lora = _lora_ops(base, rep, unmerge)
    ops = {name: list(replace_ops) for name, replace_ops in rep.ops.items()}  # replacements apply first
    for name, op in lora.placed:
        ops.setdefault(name, []).append(op)
    applied = [full | mods for full, mods in zip(rep.applied, lora.applied, strict=True)]
    fused = _param_and_token_ops(base, rep.adapters, unmerge, ops, applied)
    return _Plan(base, rep.adapters, ops, rep.extra, rep.new_shapes, rep.config_updates,
                 list(dict.fromkeys(rep.notes + lora.notes)), unmerge, dtype, device, applied, fused)


# ------------------------------------------------- target_parameters (ParamWrapper) and trainable tokens


def _param_order(base: _Base) -> list[str]:
    """Every parameter of the model in memory in registration order (the order PEFT wraps them in)."""
    model = base.names.model if base.names is not None else None
    if model is not None:
        return [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names = list(base.shapes)
    return [base.names.module_name(n) for n in names] if base.names is not None else names


def _resolve_param(ad: _Adapter, key: str, order: list[str]) -> str:
    """The parameter PEFT's ParamWrapper saved under `key` (``<owner>[.base_layer]*``) wraps: the
    owner's targeted parameters in registration order, the first innermost."""
    owner, depth = key.replace(".base_layer", ""), key.count(".base_layer")
    targets = ad.config.raw.get("target_parameters") or []
    mine = [p for p in order if p.rpartition(".")[0] == owner
            and (p in targets or any(p.endswith("." + t) for t in targets))]
    if depth >= len(mine):
        raise AdapterError(f"{ad.path}: LoRA saved under {key!r}: target_parameters {targets} match {len(mine)} "
                           f"parameter(s) of {owner!r} in the base; is the adapter for another model?")
    return mine[len(mine) - 1 - depth]


def _param_slot(ad: _Adapter, param: str, base: _Base) -> tuple[str, tuple[int, ...], bool, str | None]:
    """(name the ops are keyed by, shape, is_transposed, fused-from-sources marker) of a parameter."""
    nm, model = base.names, base.names.model if base.names is not None else None
    fusion = nm.fusion_of(param) if nm is not None else None
    owner = model.get_submodule(param.rpartition(".")[0]) if model is not None else None
    transposed = bool(getattr(owner, "is_transposed", False))
    if fusion is not None and model is not None:
        return param, tuple(model.get_parameter(param).shape), transposed, fusion.sources[0]
    stored = base.checkpoint_name(param)
    if stored not in base.shapes:
        raise AdapterError(f"{ad.path}: target parameter {param!r} is not in the base {base.where}; "
                           f"is the adapter for another model?")
    return stored, base.shapes[stored], transposed, None


def _param_op(i: int, ad: _Adapter, key: str, order: list[str], base: _Base) -> tuple[str, _Op, str | None]:
    """Adapter i's op for one ParamWrapper LoRA, after checking its factors against the parameter."""
    m = ad.params[key]
    param = _resolve_param(ad, key, order)
    target, shape, transposed, source = _param_slot(ad, param, base)
    r = ad.config.rank_for(param)
    if len(shape) == 3:
        experts, (out_f, in_f) = shape[0], (shape[2], shape[1]) if transposed else shape[1:]
    elif len(shape) == 2:
        experts, (out_f, in_f) = 1, shape
    else:
        raise AdapterError(f"{ad.path}: target parameter {param} has shape {shape}; PEFT wraps 2-D and 3-D ones only")
    want_a, want_b = (r * experts, in_f), (out_f, r * experts)
    if tuple(m.A.shape) != want_a or tuple(m.B.shape) != want_b:
        raise AdapterError(f"{ad.path}: {param}: A {tuple(m.A.shape)} / B {tuple(m.B.shape)} do not fit the parameter "
                           f"{shape} at r={r} (expected A {want_a}, B {want_b}); is the adapter for another model?")
    mod = replace(m, module=param, scaling=ad.config.scaling_for(param))
    return target, _Op(i, "param", ad.weight, module=mod, fifo=transposed, experts=experts), source


def _token_op(i: int, ad: _Adapter, module: str, base: _Base, unmerge: bool) -> tuple[str, _Op]:
    """Adapter i's op for one trainable-tokens delta: the saved rows replace those rows."""
    index, rows = ad.tokens[module]
    if unmerge:
        raise AdapterError(f"{ad.path}: trainable tokens of {module} replace rows whose base values are not in the "
                           f"adapter, so unmerge cannot restore them; merge from the original base")
    if ad.weight != 1.0:
        raise OptionError(f"{ad.path}: trainable tokens of {module} replace rows; they cannot be scaled, use "
                          f"weight 1", field="weights")
    target = _resolve(base.checkpoint_name(f"{module}.weight"), base)
    if target is None:
        raise AdapterError(f"{ad.path}: trainable tokens on {module!r}, which has no weight in the base {base.where}")
    shape = base.shapes[target]
    if tuple(rows.shape) != (len(index), shape[-1]) or not all(0 <= j < shape[0] for j in index):
        raise AdapterError(f"{ad.path}: trainable tokens of {module}: rows {tuple(rows.shape)} for indices {index} "
                           f"do not fit {target} {shape}; is the adapter for another model?")
    return target, _Op(i, "rows", 1.0, tensor=rows, index=list(index))


def _param_and_token_ops(base: _Base, adapters: list[_Adapter], unmerge: bool, ops: dict[str, list[_Op]],
                         applied: list[set[str]]) -> dict[str, str]:
    """Phase: target_parameters LoRAs and trainable tokens into `ops` (rows first, as PEFT loads
    them before merging); returns stored source -> fused parameter for stacks built on the fly."""
    fused: dict[str, str] = {}
    order = _param_order(base) if any(ad.params for ad in adapters) else []
    for i, ad in enumerate(adapters):
        for module in ad.tokens:
            target, op = _token_op(i, ad, module, base, unmerge)
            ops.setdefault(target, []).insert(0, op)
            applied[i].add(module)
        for key in ad.params:
            target, op, source = _param_op(i, ad, key, order, base)
            ops.setdefault(target, []).append(op)
            applied[i].add(key)
            if source is not None and base.names is not None:
                fused.update(dict.fromkeys(base.names.fusion_of(target).sources, target))  # type: ignore[union-attr]
    return fused


# ----------------------------------------------------------------------------- math


def param_delta(m: LoraModule, experts: int, transposed: bool, device: torch.device | str = "cpu",
                weight: float = 1.0) -> torch.Tensor:
    """PEFT's ParamWrapper.get_delta_weight in fp32: a 2-D parameter as a Linear; an expert stack
    (E, out, in) from A (r*E, in), B (out, r*E) by PEFT's einsum ((E, in, out) when is_transposed)."""
    a = m.A.to(device=device, dtype=torch.float32)
    b = m.B.to(device=device, dtype=torch.float32)
    if experts == 1:
        return (b @ a) * (m.scaling * weight)
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts)
    eq = "o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i"
    return torch.einsum(eq, b3, a3) * (m.scaling * weight)



def _t(x: torch.Tensor, fifo: bool) -> torch.Tensor:
    return x.T if fifo else x


def _conv_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's _ConvNd.get_delta_weight (groups=1): a 1x1 Conv2d as a matrix product, otherwise
    conv(A^T, B)^T; (out, in, *kernel)."""
    if a.dim() == 4 and tuple(a.shape[2:]) == (1, 1):
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[a.dim()]
    return conv(a.transpose(0, 1), b).transpose(0, 1) * scaling


def lora_delta(m: LoraModule, fifo: bool = False, device: torch.device | str = "cpu",
               weight: float = 1.0) -> torch.Tensor:
    """PEFT's get_delta_weight in fp32, in the layout of the stored weight; `weight` multiplies the
    scaling first (PEFT's weighted merge: scaling *= weight, then (B @ A) * scaling)."""
    a = m.A.to(device=device, dtype=torch.float32)  # (r, in) / embedding (r, vocab) / conv (r, in, *k)
    b = m.B.to(device=device, dtype=torch.float32)  # (out, r) / embedding (dim, r) / conv (out, r, 1, ...)
    if a.dim() > 2:
        return _conv_delta(a, b, m.scaling * weight)
    ba = (b @ a).mul_(m.scaling * weight)  # scaled in place: the same rounding as PEFT's (B @ A) * s
    if m.kind == "embedding":
        return ba.T  # (vocab, dim)
    return _t(ba, fifo)  # (out, in), Conv1D (in, out)


def dora_merge(base32: torch.Tensor, m: LoraModule, fifo: bool, delta: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA merge: (m / ‖W + Δ‖) ⊙ (W + Δ), norm of the unmerged base plus the scaled delta."""
    if m.magnitude is None:
        raise TypeError(f"{m.module}: dora_merge needs the DoRA magnitude")
    mag = m.magnitude.to(device=base32.device, dtype=torch.float32)  # (out,) / embedding (dim,)
    if m.kind == "embedding":
        # DoraEmbeddingLayer has fan_in_fan_out=True: norm over the vocabulary, one per embedding dim
        norm = torch.linalg.norm(base32.T + 1 * delta.T, dim=1)  # (dim,)
        factor = (mag / norm).view(1, -1)  # (1, dim)
    else:
        norm = torch.linalg.norm(_t(base32, fifo) + 1 * _t(delta, fifo), dim=1)  # (out,)
        factor = _t((mag / norm).view(-1, 1), fifo)  # (out, 1), Conv1D (1, out)
    return factor * (base32 + delta)


def _apply_ops(t: torch.Tensor, ops: Sequence[_Op], unmerge: bool, device: torch.device) -> torch.Tensor:
    """Base tensor + every op on it, in fp32 (see the module docstring for the semantics)."""
    base32 = t.to(device=device, dtype=torch.float32)
    # Plain LoRA/bias ops add in place (one fp32 copy of the tensor in flight instead of
    # three); DoRA needs the untouched base, so it keeps the out-of-place adds.
    inplace = not any(op.kind == "dora" for op in ops)
    if inplace and base32 is t:
        base32 = t.clone()  # never write into the reader's buffer
    for op in ops:
        if op.kind == "rows":  # PEFT's index_copy of the saved rows, in the weight's dtype: exact
            rows = op.full().to(device=device, dtype=t.dtype).float()
            base32 = base32.index_copy(0, torch.tensor(op.index, device=device), rows)
        if op.kind == "replace":
            s = op.full().to(device=device, dtype=torch.float32)
            base32 = s if op.weight == 1.0 else base32 + op.weight * (s - base32)
            if inplace and base32 is op.tensor:
                base32 = base32.clone()  # nor into the adapter's own tensor
    out = base32
    last = None  # adapter of the previous delta
    for op in ops:
        if op.kind in ("lora", "bias", "param") and inplace and last is not None and op.adapter != last \
                and t.dtype != torch.float32 and not unmerge:
            # PEFT merges adapter after adapter into the weight: it is rounded to its dtype in between
            out = out.to(t.dtype).float()
        if op.kind == "lora":
            d = lora_delta(op.lora(), op.fifo, device, op.weight)
            if op.lora().kind == "embedding" and not unmerge:
                # PEFT's Embedding.merge adds get_delta_weight(...).to(weight dtype): the delta is
                # rounded to the base dtype first (Linear adds the fp32 delta, one rounding)
                d = d.to(t.dtype).float()
            d = d.neg_() if unmerge else d
            out = out.add_(d) if inplace else out + d
        elif op.kind == "param":  # PEFT casts the delta to the parameter's dtype, then adds
            d = param_delta(op.lora(), op.experts, op.fifo, device, op.weight).to(t.dtype).float()
            d = d.neg_() if unmerge else d
            out = out.add_(d) if inplace else out + d
        elif op.kind == "bias":
            d = op.bias().to(device=device, dtype=torch.float32) * (op.lora().scaling * op.weight)  # (out,)
            d = d.neg_() if unmerge else d
            out = out.add_(d) if inplace else out + d
        elif op.kind == "dora":
            merged = dora_merge(base32, op.lora(), op.fifo, lora_delta(op.lora(), op.fifo, device))
            if out is base32 and op.weight == 1.0:
                out = merged  # bit-identical to PEFT for a lone DoRA adapter
            else:
                out = out + op.weight * (merged - base32)
        if op.kind not in ("replace", "rows"):
            last = op.adapter
    return out


def _finish(name: str, t: torch.Tensor, plan: _Plan, ops: Sequence[_Op] | None) -> torch.Tensor:
    out_dtype = plan.dtype if (plan.dtype is not None and t.is_floating_point()) else t.dtype
    if not ops:
        res = t if out_dtype == t.dtype else t.to(out_dtype)
    else:
        res = _apply_ops(t, ops, plan.unmerge, plan.device).to(out_dtype).cpu()
    # Every floating tensor written is checked, touched or not: a NaN/inf in the base, an
    # overflow of the dtype cast or a broken adapter must not land in a complete-looking model.
    if not all_finite(res):  # in blocks: no full-size temporary
        bad = count_non_finite(res)
        if not all_finite(t):
            raise ValidationError(
                f"base tensor {name} has {count_non_finite(t)} non-finite value(s) (NaN/inf); "
                f"the base checkpoint is corrupt; nothing was written"
            )
        if not ops:
            raise ValidationError(
                f"tensor {name} overflows {out_dtype} ({bad} value(s) become inf); "
                f"choose another dtype (bf16 or fp32); nothing was written"
            )
        who = ", ".join(sorted({plan.adapters[op.adapter].path for op in ops}))
        raise ValidationError(
            f"merged tensor {name} has {bad} non-finite value(s) (NaN/inf in {out_dtype}) after applying {who}; "
            f"the adapter is broken or its weight too large; nothing was written"
        )
    return res


# ----------------------------------------------------------------------------- loading


def _normalize_full(path: Path, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrapper copies PEFT saves beside a resized embedding in modules_to_save:
    `<m>.original_module.<p>` (the base values) and `<m>.modules_to_save.<p>` (the same
    trained values as `<m>.<p>`); PEFT's loader places only `<m>.<p>`."""
    out: dict[str, torch.Tensor] = {}
    dup: dict[str, torch.Tensor] = {}
    for name, t in full.items():
        if ".original_module." in name:
            continue
        if ".modules_to_save." in name:
            dup[name.replace(".modules_to_save.", ".")] = t
            continue
        out[name] = t
    for name, t in dup.items():
        if name not in out:
            out[name] = t
        elif not torch.equal(out[name], t):
            raise AdapterError(f"{path}: {name} and its modules_to_save copy differ; re-save the adapter with PEFT")
    return out


def _load_adapters(adapters: Sequence[str | Path], weights: list[float]) -> list[_Adapter]:
    """Phase: read and validate each adapter directory (surgery.core.peft_format.read_adapter)."""
    out = []
    for path, w in zip(adapters, weights, strict=True):
        p = Path(path)
        if not p.is_dir():
            raise AdapterError(f"{p}: not an adapter directory "
                               f"(expected adapter_config.json + adapter_model.safetensors)")
        cfg, modules, full = read_adapter(p, allow=("target_parameters", "trainable_token_indices"))
        tokens, full = split_token_rows(cfg, full, str(p))
        params = {n: modules.pop(n) for n in list(modules) if modules[n].kind == "param"}
        out.append(_Adapter(str(path), cfg, modules, _normalize_full(p, full), w, params=params, tokens=tokens))
    return out


def _base_from_index(idx: CheckpointIndex) -> _Base:
    def read(name: str) -> torch.Tensor:
        with LazyReader(idx) as r:
            return r.get(name)

    return _Base(
        where=str(idx.source or idx.root),
        shapes={n: tuple(i.shape) for n, i in idx.tensors.items()},
        dtypes={n: i.dtype for n, i in idx.tensors.items()},
        tied=dict(idx.tied),
        config=idx.config,
        read=read,
        names=name_map(idx.config, idx.tensors),
    )


def _prepare(base: str | Path, adapters: Sequence[str | Path], opts: MergeOptions) -> tuple[CheckpointIndex, _Plan]:
    weights = opts.weight_list(len(adapters))
    dt, dev = parse_dtype(opts.dtype), resolve_device(opts.device)
    idx = open_checkpoint(base)
    if idx.kind != "model":
        raise CheckpointError(f"{base}: is an adapter, not a base model; "
                              f"pass the base model first, then the adapter(s)")
    loaded = _load_adapters(adapters, weights)
    plan = _build_plan(_base_from_index(idx), loaded, unmerge=opts.unmerge, dtype=dt, device=dev)
    return idx, plan


def _iter_plan(idx: CheckpointIndex, plan: _Plan, progress: Progress | None) -> Iterator[tuple[str, torch.Tensor]]:
    total = len(idx.tensors) + len(plan.extra)
    desc = "unmerge" if plan.unmerge else "merge"
    done = 0
    cache: dict[str, torch.Tensor] = {}
    with LazyReader(idx) as reader:
        for name, t in reader.iter():
            if name in plan.fused:
                yield name, _fused_tensor(name, reader, plan, cache)
            else:
                yield name, _finish(name, t, plan, plan.ops.get(name))
            done += 1
            if progress:
                progress(desc, done, total)
        for name, ops in plan.extra.items():
            src = plan.base.tied[name]
            if ops:  # the head starts from the shared tensor's dtype; its values come from the replace op
                yield name, _finish(name, ops[0].full().to(idx.tensors[src].dtype), plan, ops)
            else:  # an untied head keeping the base values of its (replaced) source
                yield name, _finish(name, reader.get(src), plan, None)
            done += 1
            if progress:
                progress(desc, done, total)


def merged_state_dict_iter(
    base: str | Path,
    adapters: Sequence[str | Path],
    options: MergeOptions | None = None,
    *,
    progress: Progress | None = None,
    **fields: Any,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) for every tensor of the base, in shard order, one at a time.

    Args:
        base, adapters: as for `merge`.
        options: a MergeOptions (weights, unmerge, dtype, device are used; threads applies to the
            checks run here, not to the iteration); keyword `fields` override it.
        progress: optional callback(desc, done, total).

    Returns:
        An iterator of (tensor name, tensor); a head untied by an adapter comes last.

    Raises:
        OptionError, CheckpointError, AdapterError when called (every check runs before the first
        tensor is yielded); ValidationError while iterating, for a non-finite merged tensor.

    Example:
        >>> sd = dict(merged_state_dict_iter("base/", ["lora/"], weights=[0.5]))  # doctest: +SKIP
    """
    opts = MergeOptions.build(options, **fields)
    with torch_threads(opts.threads):
        idx, plan = _prepare(base, adapters, opts)
    return _iter_plan(idx, plan, progress)


# ----------------------------------------------------------------------------- on disk


def _output_dtype(plan: _Plan, dtype: torch.dtype) -> torch.dtype:
    return plan.dtype if (plan.dtype is not None and dtype.is_floating_point) else dtype


def _default_shard_size(idx: CheckpointIndex, plan: _Plan) -> int:
    """The largest base shard, in output bytes: the output gets the same number of shards."""
    per: dict[Path, int] = {}
    for name, info in idx.tensors.items():
        shape = plan.new_shapes.get(name, info.shape)
        itemsize = torch.empty((), dtype=_output_dtype(plan, info.dtype)).element_size()
        per[info.shard] = per.get(info.shard, 0) + math.prod(shape) * itemsize
    return max(max(per.values(), default=1), 1)


def _planned_entries(idx: CheckpointIndex, plan: _Plan) -> list[tuple[str, tuple, torch.dtype]] | None:
    """(name, shape, dtype) of every output tensor in write order, when known before
    any data is read: always, unless a full replacement may change a shape."""
    if plan.extra or any(op.kind == "replace" for ops in plan.ops.values() for op in ops):
        return None
    with LazyReader(idx) as reader:
        order = reader.order()
    return [(name, tuple(idx.tensors[name].shape), _output_dtype(plan, idx.tensors[name].dtype)) for name in order]


def _updated_config(config: dict, plan: _Plan) -> dict:
    cfg = dict(config)
    for key, value in plan.config_updates.items():
        if key.startswith("text_config."):
            cfg["text_config"] = {**cfg["text_config"], key.split(".", 1)[1]: value}
        elif key == "tie_word_embeddings":
            # transformers reads the model's own config (top level); composite models' text models read
            # text_config: set both where the text config has the key
            cfg[key] = value
            if isinstance(cfg.get("text_config"), dict) and key in cfg["text_config"]:
                cfg["text_config"] = {**cfg["text_config"], key: value}
        else:
            cfg[key] = value
    if plan.dtype is not None:
        name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[plan.dtype]
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = name
        if "dtype" not in cfg and "torch_dtype" not in cfg:
            cfg["dtype"] = name
    return cfg


def _write_planned(w: ShardedWriter, idx: CheckpointIndex, plan: _Plan, changed: list[str],
                   progress: Progress | None) -> None:
    """Planned-mode loop: merged tensors are written whole; untouched ones are copied a
    block of rows at a time (checked for NaN/inf on the way), never held whole."""
    desc = "unmerge" if plan.unmerge else "merge"
    cache: dict[str, torch.Tensor] = {}
    with LazyReader(idx) as reader:
        order = reader.order()
        for done, name in enumerate(order, 1):
            info = idx.tensors[name]
            ops = plan.ops.get(name)
            if name in plan.fused:
                w.add(name, _fused_tensor(name, reader, plan, cache))
                changed.append(name)
                continue
            same_dtype = plan.dtype is None or not info.dtype.is_floating_point or plan.dtype == info.dtype
            if ops or not same_dtype or len(info.shape) == 0:
                w.add(name, _finish(name, reader.get(name), plan, ops))
                if ops:
                    changed.append(name)
            else:
                w.add_blocks(name, tuple(info.shape), info.dtype, _row_blocks(reader, name, info, plan))
            if progress:
                progress(desc, done, len(order))


def _fused_tensor(name: str, reader: LazyReader, plan: _Plan, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """A stored tensor that transformers fuses into a parameter the adapters change (per-expert
    ``w1/w3`` into ``experts.gate_up_proj``): the first of its sources builds the fused parameter by
    transformers' own conversion, merges it and splits it back; the others are served from `cache`
    (memory: one fused parameter's tensors in flight)."""
    if name not in cache:
        nm, target = plan.base.names, plan.fused[name]
        fusion = nm.fusion_of(target) if nm is not None else None
        if nm is None or fusion is None:
            raise TypeError(f"{name}: planned as fused but the base has no fusion for {target}")
        built = fusion.combine(reader.get)
        built[target] = _finish(target, built[target], plan, plan.ops[target])
        cache.update(nm.split(built))
    return _finish(name, cache.pop(name), plan, None)


def _row_blocks(reader: LazyReader, name: str, info: TensorInfo, plan: _Plan) -> Iterator[torch.Tensor]:
    """An untouched tensor a block of rows (about 4 MiB) at a time, each checked by _finish."""
    step = max(1, (1 << 22) // max(1, info.nbytes // max(1, info.shape[0])))
    for i in range(0, info.shape[0], step):
        yield _finish(name, reader.get_rows(name, i, i + step), plan, None)


def _write(idx: CheckpointIndex, plan: _Plan, w: ShardedWriter, progress: Progress | None) -> list[str]:
    """Phase: every output tensor into the writer, config and side files beside; returns the
    names of the tensors whose values changed."""
    changed: list[str] = []
    entries = _planned_entries(idx, plan)
    if entries is not None:
        w.plan(entries)  # headers known up front: tensors go straight into the shards
        _write_planned(w, idx, plan, changed, progress)
    else:
        for name, t in _iter_plan(idx, plan, progress):
            w.add(name, t)
            if name in plan.ops or name in plan.extra:
                changed.append(name)
    if idx.source is not None and Path(idx.source).is_dir():
        w.copy_files(idx.root)
    if idx.config is not None and (plan.config_updates or plan.dtype is not None):
        w.write_json("config.json", _updated_config(idx.config, plan))
    return changed


def merge(
    base: str | Path,
    adapters: Sequence[str | Path],
    out: str | Path,
    options: MergeOptions | None = None,
    *,
    progress: Progress | None = None,
    **fields: Any,
) -> MergeResult:
    """Fold LoRA adapters into a base checkpoint (or out of it with unmerge), streaming.

    Args:
        base: Hugging Face model directory (single/sharded safetensors or .bin) or a weights file.
        adapters: PEFT LoRA adapter directories, applied with options.weights (default 1.0 each).
        out: the output model directory (written atomically; inputs are never modified).
        options: a MergeOptions (weights, unmerge, dtype, shard_size, device, threads, overwrite);
            keyword `fields` are MergeOptions fields and override it, so
            `merge(b, [a], out, weights=[0.5], unmerge=True)` works without building one.
        progress: optional callback(desc, done, total).

    Returns:
        MergeResult (to_json() for machines).

    Raises:
        OptionError for bad options (field named), CheckpointError / AdapterError for bad inputs,
        OutputError for an unusable output, all before anything is written; ValidationError
        (and no output) when a merged tensor is not finite.

    Example:
        >>> merge("base/", ["lora-a/", "lora-b/"], "out/", weights=[0.7, 0.3], dtype="bf16")  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    opts = MergeOptions.build(options, **fields)
    opts.check_adapters(len(adapters))
    inputs = [Path(base), *map(Path, adapters)]
    check_output_path(Path(out), opts.overwrite, inputs)
    with torch_threads(opts.threads):
        idx, plan = _prepare(base, adapters, opts)
        size = opts.shard_size or _default_shard_size(idx, plan)
        with ShardedWriter(out, shard_size=size, overwrite=opts.overwrite, inputs=inputs) as w:
            changed = _write(idx, plan, w, progress)
            _write_card(w, base, opts, plan, changed, inputs)
            nbytes = w.total_size
    return _result(Path(out), idx, plan, changed, nbytes, time.perf_counter() - t0)


def _write_card(w: ShardedWriter, base: str | Path, opts: MergeOptions, plan: _Plan, changed: list[str],
                inputs: list[Path]) -> None:
    """A model card (README.md) inside the output before its rename: what was merged, and how."""
    from surgery.report.cards import options_dict, write_card

    assert w.tmp_dir is not None  # inside the writer's block
    summary = {("adapters unmerged" if plan.unmerge else "adapters merged"):
               ", ".join(f"{ad.path} (weight {ad.weight:g})" for ad in plan.adapters),
               "tensors changed": len(changed)}
    write_card(w.tmp_dir, "merge", str(base), options_dict(opts), summary, inputs=inputs, tags=["lora"])


def _result(out: Path, idx: CheckpointIndex, plan: _Plan, changed: list[str], nbytes: int,
            seconds: float) -> MergeResult:
    reports = [
        AdapterReport(ad.path, ad.weight, len(plan.applied[i] & set(ad.modules)), ad.config.use_dora,
                      ad.config.use_rslora, sorted(ad.full))
        for i, ad in enumerate(plan.adapters)
    ]
    vocab = plan.config_updates.get("vocab_size", plan.config_updates.get("text_config.vocab_size"))
    return MergeResult(
        out=out, unmerge=plan.unmerge, adapters=reports, tensors=len(idx.tensors) + len(plan.extra),
        changed=changed, shards=len(list(out.glob("model*.safetensors"))), bytes=nbytes,
        dtype=DTYPE_NAMES.get(plan.dtype) if plan.dtype is not None else None, vocab_size=vocab,
        notes=plan.notes, seconds=seconds,
    )


# ----------------------------------------------------------------------------- in memory


def _model_base(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> _Base:
    """A loaded model seen as a base: parameters that share storage (tied embeddings) are one."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in sd.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            tied[name] = seen[key]  # same storage: PEFT would change both through one parameter
            continue
        if key is not None:
            seen[key] = name
        shapes[name], dtypes[name] = tuple(t.shape), t.dtype
    config = getattr(getattr(model, "config", None), "to_dict", lambda: None)()
    return _Base("the model", shapes, dtypes, tied, config, read=lambda n: sd[n].detach())


def _untie_in_model(model: torch.nn.Module, plan: _Plan, sd: dict[str, torch.Tensor]) -> None:
    """Give every head the plan unties (plan.extra, no ops) its own copy of the base values."""
    for head in plan.extra:
        owner, _, pname = head.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        src = sd[plan.base.tied[head]]
        setattr(module, pname, torch.nn.Parameter(src.detach().clone(), requires_grad=src.requires_grad))
    if plan.extra:
        for cfg in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
            if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
                cfg.tie_word_embeddings = False


def apply_adapters_to_model(
    model: torch.nn.Module,
    adapters: Sequence[str | Path],
    weights: Sequence[float] | None = None,
    *,
    unmerge: bool = False,
) -> dict:
    """Fold adapters into a loaded model's parameters in place (for export-onnx --adapter).

    Args:
        model: a torch module; names are its state_dict names (for transformers models, the
            checkpoint names). Parameters that share storage (tied embeddings) are updated once.
            The math runs on the model's device.
        adapters: PEFT LoRA adapter directories.
        weights: one finite number per adapter (default 1.0 each).
        unmerge: subtract instead of add.

    Returns:
        {"changed": [tensor names], "modules": [per-adapter module count], "notes": [...]}.

    Raises:
        OptionError (field "weights" / "adapters"), AdapterError (also for a vocabulary resize or
        an untied head: merge to disk with `merge` first), ValidationError for non-finite results
        (the model is then left unchanged only up to the failing tensor).

    Example:
        >>> apply_adapters_to_model(model, ["lora/"], [0.5])["changed"][:1]  # doctest: +SKIP
        ['model.layers.0.self_attn.q_proj.weight']
    """
    opts = MergeOptions(weights=weights, unmerge=unmerge)
    weight_list = opts.weight_list(len(adapters))
    sd = model.state_dict(keep_vars=True)
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    plan = _build_plan(_model_base(model, sd), _load_adapters(adapters, weight_list), unmerge=unmerge,
                       dtype=None, device=dev)
    if plan.new_shapes or any(plan.extra.values()):
        raise AdapterError("the adapter resizes embeddings or replaces a tied head; merge it to disk with "
                           "`surgery merge` first")
    with torch.no_grad():
        _untie_in_model(model, plan, sd)
        for name, ops in plan.ops.items():
            t = sd[name]
            t.data.copy_(_finish(name, t.data, plan, ops).to(t.device))
    return {
        "changed": sorted({*plan.ops, *plan.extra}),
        "modules": [len(a) for a in plan.applied],
        "notes": plan.notes,
    }


__all__ = [
    "AdapterReport", "MergeResult", "MergeOptions", "merge", "merged_state_dict_iter", "apply_adapters_to_model",
    "lora_delta", "dora_merge", "DTYPES",
]
