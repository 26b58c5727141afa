"""PEFT LoRA adapter directories: read, validate, write.

Matches PEFT 0.21 (read from its source, checked against it in the tests):

- Saved keys carry no adapter name and start with ``base_model.model.``:
  ``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight`` (out, r),
  ``<module>.lora_B.bias`` (out,) when ``lora_bias``, embeddings
  ``<module>.lora_embedding_A`` (r, vocab) / ``<module>.lora_embedding_B`` (dim, r),
  DoRA ``<module>.lora_magnitude_vector`` (out,). Full tensors (``modules_to_save``,
  embedding base layers PEFT saves beside a targeted embedding, ``bias="all"``
  biases) are saved under their model name, e.g. ``base_model.model.classifier.weight``.
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes tried in dict order; the
  first key K with ``re.match(rf"(.*\\.)?({K})$", module)`` wins, else ``r`` /
  ``lora_alpha`` (``peft.utils.other.get_pattern_key``).
- ``target_modules`` as a list matches a module by exact name or by suffix
  ``"." + entry``; as a string, by ``re.fullmatch`` (``check_target_module_exists``);
  modules inside ``modules_to_save`` (``(^|.*\\.)M($|\\..*)``) and ``exclude_modules``
  are never adapted. ``modules_to_save`` wraps every module whose name ends
  (plain string suffix) with an entry.
- Scale is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``. The delta is
  ``scale * B @ A`` (transposed for embeddings, and for ``fan_in_fan_out`` layers
  such as GPT-2's Conv1D, whose weight is (in, out)); ``lora_B.bias`` is scaled too.

PEFT silently ignores saved keys it cannot place and pattern keys that match
nothing. Here every key must be understood, or AdapterError names it.

API::

    read_adapter_config(dir) -> LoraAdapterConfig      # adapter_config.json, validated
    parse_adapter_config(data, where) -> LoraAdapterConfig
    read_adapter(dir) -> (config, {module: LoraModule}, {base tensor name: Tensor})
    module_key_prefix(module) -> "base_model.model.<module>"
    adapter_state_dict(modules, full_tensors) -> {saved key: Tensor}
    config_for_ranks(ranks, scalings=1.0) -> {"r", "lora_alpha", "rank_pattern", "alpha_pattern"}
    write_adapter(out_dir, modules, *, full_tensors=None, base_model_name_or_path=None,
                  task_type=None, fan_in_fan_out=False, extra_config=None,
                  overwrite=False, inputs=()) -> LoraAdapterConfig

``write_adapter`` writes ``adapter_config.json`` and ``adapter_model.safetensors``
(metadata ``{"format": "pt"}``) into a temporary sibling that is renamed into place
(``surgery.io.ShardedWriter``). The written config uses full module names in
``target_modules`` (exact matches), ``r`` = the most common rank, per-module
``rank_pattern`` / ``alpha_pattern`` for the rest, and alphas chosen so that
``alpha / r`` equals each module's ``scaling`` (exactly 1.0 for extracted deltas).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.errors import AdapterError
from surgery.io import CheckpointIndex, LazyReader, ShardedWriter, load_json, open_checkpoint
from surgery.options.patterns import check_regex

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's order of preference
PREFIX = "base_model.model."
# PEFT's EMBEDDING_LAYER_NAMES: saved whole when the vocabulary was resized.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
# Output heads transformers ties to the input embedding (get_output_embeddings of the zoo's models).
TIED_HEAD_NAMES = ("lm_head", "embed_out", "output", "cls")

# Config options that change what the saved tensors mean, so a plain
# "scale * B @ A" reading would be wrong. Truthy value -> refused.
_UNSUPPORTED_OPTIONS = {
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens and cannot be merged",
    "layer_replication": "layer replication changes the model structure",
    "target_parameters": "LoRA on raw parameters is not supported",
    "trainable_token_indices": "trainable-token deltas are not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
}
# init_lora_weights values whose adapters are deltas against a *modified* base.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

_LORA_SUFFIXES = {  # saved-key suffix -> (kind, slot)
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_B.bias": ("linear", "bias"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
    ".lora_magnitude_vector": (None, "magnitude"),
}


# ----------------------------------------------------------------------------- patterns


@functools.lru_cache(maxsize=4096)
def _pattern_regex(key: str) -> re.Pattern:
    return re.compile(rf"(.*\.)?({key})$")


def pattern_value(pattern: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup (get_pattern_key, then .get)."""
    for key in pattern:
        if _pattern_regex(key).match(module):
            return pattern[key]
    return pattern.get(module, default)  # PEFT falls back to the module name itself


def _in_modules_to_save(module: str, modules_to_save: Iterable[str] | None) -> bool:
    # PEFT excludes these from LoRA targets (check_target_module_exists).
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in modules_to_save or ())


# ----------------------------------------------------------------------------- config


@dataclass
class LoraAdapterConfig:
    """A parsed, validated LoRA adapter_config.json."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str | None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    raw: dict = field(default_factory=dict)

    def rank_for(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        return pattern_value(self.alpha_pattern, module, self.lora_alpha)

    def scaling_for(self, module: str) -> float:
        r, alpha = self.rank_for(module), self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def tied_head(self, module: str) -> bool:
        """With ensure_weight_tying, PEFT also puts a LoRA on the output head tied to a targeted input
        embedding (saved as `lm_head.lora_A/B`), though target_modules does not name it. Whether the
        base really ties it is checked when merging."""
        return self.raw.get("ensure_weight_tying") is True and module.rsplit(".", 1)[-1] in TIED_HEAD_NAMES

    def targets(self, module: str) -> bool | None:
        """Would PEFT put a LoRA layer on `module`? None when the config cannot tell
        without the model (target_modules null or "all-linear")."""
        raw = self.raw
        excl = raw.get("exclude_modules")
        if isinstance(excl, str) and re.fullmatch(excl, module):
            return False
        if isinstance(excl, list) and (module in excl or any(module.endswith(f".{e}") for e in excl)):
            return False
        if _in_modules_to_save(module, self.modules_to_save):
            return False
        tm = self.target_modules
        if tm is None or (isinstance(tm, str) and tm.lower() == "all-linear"):
            return None
        if isinstance(tm, str):
            return re.fullmatch(tm, module) is not None
        if module in tm:
            return True
        if not any(module.endswith(f".{t}") for t in tm):
            return False
        layers = raw.get("layers_to_transform")
        if layers is None or layers == []:
            return True
        lp = raw.get("layers_pattern")
        if not lp:
            m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            m = None
            for p in [lp] if isinstance(lp, str) else lp:
                m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
                if m:
                    break
        if m is None:
            return False
        idx = int(m.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool)):
        return False
    try:
        return math.isfinite(float(v))  # a 400-digit integer overflows float: not a usable number
    except OverflowError:
        return False


MAX_RANK = 1 << 24  # far above any real LoRA rank; bigger values are typos or crafted configs
MAX_REGEX_CHARS = 1000


def _check_regex(text: str, where: str, what: str, wrap: Callable[[str], str]) -> None:
    """A valid pattern (also as PEFT wraps it) that cannot backtrack catastrophically: the shared
    guard (surgery.options.patterns.check_regex) refuses nested quantifiers and over-long patterns
    before anything is matched."""
    check_regex(text, f"{where}: {what}", error=AdapterError, max_length=MAX_REGEX_CHARS)
    try:
        re.compile(wrap(text))
    except (re.error, RecursionError, OverflowError) as e:
        raise AdapterError(f"{where}: {what} {text!r} is not a valid regular expression ({e}); "
                           f"fix the pattern") from None


def _bad(where: str, data: dict, key: str, want: str) -> AdapterError:
    return AdapterError(f"{where}: {key} must be {want}, got {data.get(key)!r}; fix adapter_config.json")


def _check_peft_type(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise AdapterError(f"{where}: expected a JSON object")
    ptype = data.get("peft_type")
    if ptype is None:
        raise AdapterError(f"{where}: no peft_type; is this a PEFT adapter_config.json? add \"peft_type\": \"LORA\"")
    if ptype != "LORA":
        raise AdapterError(
            f"{where}: unsupported adapter type {ptype} (peft_type); "
            f"only LoRA adapters (peft_type \"LORA\") are supported"
        )


def _parse_scalars(data: dict, where: str) -> dict[str, Any]:
    """r, lora_alpha (LoraConfig's defaults: 8, 8) and the boolean flags."""
    r = data.get("r", 8)
    if not _is_int(r) or not 0 < r <= MAX_RANK:
        raise _bad(where, data, "r", f"a positive integer up to {MAX_RANK}")
    alpha = data.get("lora_alpha", 8)
    if not _is_num(alpha):
        raise _bad(where, data, "lora_alpha", "a finite number")
    out: dict[str, Any] = {"r": r, "lora_alpha": alpha}
    for key in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias"):
        out[key] = data.get(key, False)
        if not isinstance(out[key], bool):
            raise _bad(where, data, key, "true or false")
    return out


def _check_targets(data: dict, where: str) -> None:
    """target_modules / exclude_modules: a list of names, a regex string or null."""
    for key in ("target_modules", "exclude_modules"):
        v = data.get(key)
        if isinstance(v, str):
            _check_regex(v, where, key, lambda s: s)
        elif v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
            raise _bad(where, data, key, "a list of module names, a regex string or null")


def _parse_patterns(data: dict, where: str) -> dict[str, dict]:
    """rank_pattern (positive integers) and alpha_pattern (finite numbers), keys valid regexes."""
    patterns = {}
    for key, ok, want in (("rank_pattern", lambda v: _is_int(v) and 0 < v <= MAX_RANK,
                           f"positive integers up to {MAX_RANK}"),
                          ("alpha_pattern", _is_num, "finite numbers")):
        p = data.get(key) or {}
        if not isinstance(p, dict):
            raise _bad(where, data, key, "an object mapping module patterns to values")
        for k, v in p.items():
            _check_regex(k, where, f"{key} key", lambda s: rf"(.*\.)?({s})$")
            if not ok(v):
                raise AdapterError(f"{where}: {key}[{k!r}] = {v!r}; values must be {want}")
        patterns[key] = dict(p)
    return patterns


def _check_module_options(data: dict, where: str) -> None:
    """modules_to_save, task_type, base_model_name_or_path, bias."""
    mts = data.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) and m for m in mts)):
        raise _bad(where, data, "modules_to_save", "a list of module names or null")
    for m in mts or ():
        _check_regex(m, where, "modules_to_save entry", lambda s: rf"(^|.*\.){s}($|\..*)")
    for key in ("task_type", "base_model_name_or_path"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _bad(where, data, key, "a string or null")
    if data.get("bias", "none") not in ("none", "all", "lora_only"):
        raise _bad(where, data, "bias", '"none", "all" or "lora_only"')


def _check_layers(data: dict, where: str) -> None:
    """layers_pattern (string(s), valid regexes) and layers_to_transform (integer(s))."""
    lp = data.get("layers_pattern")
    if lp is not None and not (isinstance(lp, str) or (isinstance(lp, list) and all(isinstance(p, str) for p in lp))):
        raise _bad(where, data, "layers_pattern", "a string, a list of strings or null")
    for p in [lp] if isinstance(lp, str) else lp or ():
        _check_regex(p, where, "layers_pattern", lambda s: rf"(?:^|.*?\.){s}\.(?P<idx>\d+)\.")
    lt = data.get("layers_to_transform")
    if lt is not None and not (_is_int(lt) or (isinstance(lt, list) and all(_is_int(i) for i in lt))):
        raise _bad(where, data, "layers_to_transform", "an integer, a list of integers or null")


def _check_supported(data: dict, where: str, allow: Collection[str] = ()) -> None:
    """Options whose saved tensors are not plain LoRA factors against the unmodified base
    (those in `allow` are accepted: the caller handles them)."""
    for key, why in _UNSUPPORTED_OPTIONS.items():
        if data.get(key) and key not in allow:
            raise AdapterError(f"{where}: {key} is set ({why}); only plain LoRA / rsLoRA / DoRA adapters are supported")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterError(
            f"{where}: init_lora_weights={init!r}: this adapter is a delta against a modified base model; "
            f"convert it first with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...)"
        )


def parse_adapter_config(data: dict, where: str = CONFIG_NAME, *, allow: Collection[str] = ()) -> LoraAdapterConfig:
    """Validate an adapter_config.json dict.

    Args:
        data: the parsed JSON.
        where: names the config in error messages (a path, usually).
        allow: options otherwise refused that the caller handles ("target_parameters",
            "trainable_token_indices").

    Returns:
        LoraAdapterConfig (`raw` keeps every key of `data`).

    Raises:
        AdapterError naming the first key at fault and how to fix it: not LoRA, bad values,
        invalid regexes, options whose tensors are not plain LoRA factors.

    Example:
        >>> parse_adapter_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8}).scaling_for("q_proj")
        2.0
    """
    _check_peft_type(data, where)
    scalars = _parse_scalars(data, where)
    _check_targets(data, where)
    patterns = _parse_patterns(data, where)
    _check_module_options(data, where)
    _check_layers(data, where)
    _check_supported(data, where, allow)
    mts = data.get("modules_to_save")
    return LoraAdapterConfig(
        **scalars, target_modules=data.get("target_modules"),
        rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
        modules_to_save=list(mts) if mts is not None else None,
        task_type=data.get("task_type"), base_model_name_or_path=data.get("base_model_name_or_path"),
        raw=dict(data),
    )


def read_adapter_config(path: str | Path, *, allow: Collection[str] = ()) -> LoraAdapterConfig:
    """Read and validate <dir>/adapter_config.json (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    if not p.is_file():
        raise AdapterError(f"{p}: not found; an adapter directory needs adapter_config.json "
                           f"(PEFT save_pretrained writes it)")
    data = load_json(p, error=AdapterError)  # one line for unreadable / invalid / oversized JSON
    return parse_adapter_config(data, str(p), allow=allow)


# ----------------------------------------------------------------------------- modules


@dataclass
class LoraModule:
    """One adapted module. Delta (base layout, before fan_in_fan_out / embedding
    transposes): scaling * B @ A; bias delta: scaling * bias."""

    module: str                       # name in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str                         # "linear" | "embedding"
    A: torch.Tensor                   # linear (r, in); embedding (r, vocab)
    B: torch.Tensor                   # linear (out, r); embedding (dim, r)
    bias: torch.Tensor | None = None  # lora_B.bias (out,)
    magnitude: torch.Tensor | None = None  # DoRA (out,)
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class ParamLora:
    """A LoRA on a raw parameter (PEFT ``target_parameters``, lora.ParamWrapper), e.g. a stack of
    MoE experts (E, d1, d2). Factors in PEFT's layout: A (r * E, in), B (out, r * E), row
    ``e * r + j`` of A and column ``j * E + e`` of B being expert e's j-th factor; each expert's
    delta (d1, d2) is ``scaling * B_e @ A_e`` (transposed for ``is_transposed`` modules).

    `depth` is how many ParamWrappers PEFT nests outside this one on the same module: PEFT wraps
    a module's targeted parameters in registration order, the first innermost, and saves the
    inner ones under ``<module>.base_layer...``."""

    param: str                 # "model.layers.0.mlp.experts.gate_up_proj"
    A: torch.Tensor            # (r * E, in)
    B: torch.Tensor            # (out, r * E)
    experts: int = 1
    depth: int = 0
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0]) // self.experts

    def keys(self) -> dict[str, torch.Tensor]:
        p = module_key_prefix(self.param.rsplit(".", 1)[0]) + ".base_layer" * self.depth
        return {f"{p}.lora_A.weight": self.A, f"{p}.lora_B.weight": self.B}


def module_key_prefix(module: str) -> str:
    return PREFIX + module


def _module_keys(m: LoraModule) -> dict[str, torch.Tensor]:
    p = module_key_prefix(m.module)
    if m.kind == "embedding":
        out = {f"{p}.lora_embedding_A": m.A, f"{p}.lora_embedding_B": m.B}
    else:
        out = {f"{p}.lora_A.weight": m.A, f"{p}.lora_B.weight": m.B}
        if m.bias is not None:
            out[f"{p}.lora_B.bias"] = m.bias
    if m.magnitude is not None:
        out[f"{p}.lora_magnitude_vector"] = m.magnitude
    return out


def adapter_state_dict(
    modules: Mapping[str, LoraModule], full_tensors: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of an adapter under the keys PEFT saves them with."""
    sd: dict[str, torch.Tensor] = {}
    for m in modules.values():
        sd.update(_module_keys(m))
    for name, t in (full_tensors or {}).items():
        key = PREFIX + name
        if key in sd:
            raise AdapterError(f"full tensor {name!r} collides with a LoRA key; rename it")
        sd[key] = t
    return sd


# ----------------------------------------------------------------------------- read


def _classify(key: str) -> tuple[str, str | None, str] | None:
    """key without prefix -> (module, kind, slot) for LoRA keys, else None."""
    for suffix, (kind, slot) in _LORA_SUFFIXES.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], kind, slot
    return None


def _full_tensor_name(key: str, cfg: LoraAdapterConfig, lora_modules: set[str]) -> str | None:
    """Base-model tensor name for a saved full tensor PEFT would load, else None."""
    parts = key.split(".")
    if len(parts) < 2:
        return None
    if key.endswith(TOKENS_DELTA) and cfg.raw.get("trainable_token_indices"):
        return key
    # `<adapted module>.base_layer.<param>`: embedding base layers, lora_only biases
    if ".base_layer." in key:
        owner, _, param = key.partition(".base_layer.")
        return f"{owner}.{param}" if owner in lora_modules and "." not in param else None
    # modules_to_save: any enclosing module whose name ends with an entry (str.endswith, as PEFT)
    for i in range(1, len(parts)):
        if any(".".join(parts[:i]).endswith(m) for m in cfg.modules_to_save or ()):
            return key
    if cfg.raw.get("bias", "none") == "all" and parts[-1] == "bias":
        return key
    if parts[-2] in EMBEDDING_LAYER_NAMES and parts[-1] == "weight":  # resized vocabulary
        return key
    return None


@dataclass
class _SavedKeys:
    """An adapter file's keys sorted out: LoRA slots per module, and the full tensors."""

    modules: dict[str, tuple[str, dict[str, str]]]  # module -> (kind, slot -> saved key)
    full: dict[str, str]                            # base tensor name -> saved key


def _lora_slots(keys: Iterable[str], where: Path) -> tuple[dict[str, dict[str, str]], dict[str, set[str]], list[str]]:
    """(module -> slot -> saved key, module -> kinds seen, keys that are not LoRA weights)."""
    slots: dict[str, dict[str, str]] = {}
    kinds: dict[str, set[str]] = {}
    others: list[str] = []
    for key in keys:
        if not key.startswith(PREFIX):
            raise AdapterError(f"{where}: key {key!r} does not start with {PREFIX!r}; PEFT would ignore it")
        c = _classify(key[len(PREFIX):])
        if c is None:
            others.append(key)
            continue
        module, kind, slot = c
        slots.setdefault(module, {})[slot] = key
        if kind:
            kinds.setdefault(module, set()).add(kind)
    return slots, kinds, others


def _full_keys(others: list[str], cfg: LoraAdapterConfig, lora_modules: set[str], where: Path) -> dict[str, str]:
    """Base tensor name -> saved key, for every key that is not a LoRA weight (else AdapterError)."""
    full: dict[str, str] = {}
    for key in others:
        name = _full_tensor_name(key[len(PREFIX):], cfg, lora_modules)
        if name is None:
            raise AdapterError(
                f"{where}: unknown key {key!r}: not a LoRA weight of a module, nor in modules_to_save "
                f"{cfg.modules_to_save}; PEFT would silently ignore or misplace it"
            )
        if name in full:
            raise AdapterError(f"{where}: keys {full[name]!r} and {key!r} both hold tensor {name!r}; keep one")
        full[name] = key
    return full


def _sort_keys(idx: CheckpointIndex, cfg: LoraAdapterConfig, where: Path) -> _SavedKeys:
    """Every saved key placed (a LoRA slot of one module or a full tensor), from the header only."""
    slots, kinds, others = _lora_slots(idx.tensors, where)
    full = _full_keys(others, cfg, set(slots), where)
    modules: dict[str, tuple[str, dict[str, str]]] = {}
    for module, s in slots.items():
        kind = kinds.get(module, set())
        if len(kind) != 1 or "A" not in s or "B" not in s:
            have = ", ".join(sorted(k[len(PREFIX) + len(module) + 1:] for k in s.values()))
            raise AdapterError(
                f"{where}: module {module!r} has {have} but needs one lora_A/lora_B "
                f"(or lora_embedding_A/lora_embedding_B) pair"
            )
        modules[module] = (kind.pop(), s)
    return _SavedKeys(modules, full)


def read_adapter(
    path: str | Path, *, allow: Collection[str] = ()
) -> tuple[LoraAdapterConfig, dict[str, LoraModule], dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter directory.

    Keys and shapes are checked from the file header before any tensor is read.

    Args:
        path: the adapter directory (adapter_config.json + adapter_model.safetensors or .bin).
        allow: options otherwise refused. "target_parameters": LoRAs on raw parameters come back as
            LoraModule(kind="param") keyed by PEFT's module key (``<owner>[.base_layer...]``;
            scaling 1.0: the caller resolves the parameter, its rank and scaling).
            "trainable_token_indices": each ``<module>.token_adapter.trainable_tokens_delta`` comes
            back among the full tensors under that name.

    Returns:
        (config, {module name: LoraModule}, {base tensor name: full tensor}).

    Raises:
        AdapterError for a config or key PEFT would ignore or misplace, ranks or shapes that do
        not fit; CheckpointError for corrupt files and pickles that carry code.

    Example:
        >>> cfg, modules, full = read_adapter("fixtures/tiny-llama-lora")  # doctest: +SKIP
    """
    root = Path(path)
    cfg = read_adapter_config(root, allow=allow)
    if not any((root / n).is_file() for n in WEIGHT_NAMES):
        raise AdapterError(f"{root}: no adapter_model.safetensors or adapter_model.bin beside adapter_config.json")
    idx = open_checkpoint(root)  # CheckpointError for corrupt files and pickles that carry code
    where = idx.shards[0]
    keys = _sort_keys(idx, cfg, where)
    for module, (kind, s) in list(keys.modules.items()):
        if _param_wrapper(cfg, module):
            keys.modules[module] = ("param", s)
            continue
        _check_module(cfg, where, module, kind, {slot: idx.tensors[k].shape for slot, k in s.items()},
                      {slot: idx.tensors[k].dtype for slot, k in s.items()})

    out: dict[str, LoraModule] = {}
    tensors: dict[str, torch.Tensor] = {}
    with LazyReader(idx) as reader:
        for module, (kind, s) in keys.modules.items():
            t = {slot: reader.get(k) for slot, k in s.items()}
            out[module] = LoraModule(module, kind, t["A"], t["B"], t.get("bias"), t.get("magnitude"),
                                     cfg.scaling_for(module))
        for name, key in keys.full.items():
            tensors[name] = reader.get(key)
    return cfg, out, tensors


TOKENS_DELTA = ".token_adapter.trainable_tokens_delta"


def token_indices(cfg: LoraAdapterConfig, module: str, where: str) -> list[int]:
    """The token ids of MODULE's trainable tokens: trainable_token_indices as a list (the input
    embedding's) or a dict whose key is MODULE or a dotted suffix of it (PEFT's matching)."""
    spec = cfg.raw.get("trainable_token_indices")
    if isinstance(spec, dict):
        spec = next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
    if not isinstance(spec, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        raise AdapterError(f"{where}: trainable_token_indices gives no list of token ids for {module}")
    return spec


def split_token_rows(cfg: LoraAdapterConfig, full: Mapping[str, torch.Tensor], where: str,
                     ) -> tuple[dict[str, tuple[list[int], torch.Tensor]], dict[str, torch.Tensor]]:
    """read_adapter's full tensors (read with allow=("trainable_token_indices",)) split into
    trainable tokens {module: (ids, rows)} and the other full tensors."""
    tokens, rest = {}, {}
    for name, t in full.items():
        if name.endswith(TOKENS_DELTA):
            module = name.removesuffix(TOKENS_DELTA)
            ids = token_indices(cfg, module, where)
            if t.dim() != 2 or t.shape[0] != len(ids):
                raise AdapterError(f"{where}: trainable tokens of {module}: rows {tuple(t.shape)} for {len(ids)} "
                                   "token ids")
            tokens[module] = (list(ids), t)
        else:
            rest[name] = t
    return tokens, rest


def _param_wrapper(cfg: LoraAdapterConfig, module: str) -> bool:
    """Whether saved module key `module` is a PEFT ParamWrapper (a target_parameters LoRA): nested
    ones are saved under ``.base_layer``; the outermost one on a module target_modules does not take."""
    targets = cfg.raw.get("target_parameters") or []
    if not targets:
        return False
    stripped = module.replace(".base_layer", "")
    if stripped != module:
        return True
    if cfg.targets(module) is True:
        return False
    owners = [t.rpartition(".")[0] for t in targets]
    return any(o == "" or stripped == o or stripped.endswith("." + o) for o in owners)


def _check_factors(cfg: LoraAdapterConfig, module: str, shapes: dict, dtypes: dict) -> str | None:
    """What is wrong with a module's A / B (dtype, shapes, rank, targeting), or None."""
    bad_dtype = [f"{slot} has dtype {dt}; LoRA weights must be floating point"
                 for slot, dt in dtypes.items() if not dt.is_floating_point]
    if bad_dtype:
        return bad_dtype[0]
    a, b = shapes["A"], shapes["B"]
    conv = len(a) == len(b) and 3 <= len(a) <= 5 and all(k == 1 for k in b[2:])  # Conv1d/2d/3d LoRA
    if not conv and (len(a) != 2 or len(b) != 2):
        return (f"A {tuple(a)} / B {tuple(b)} are neither matrices nor conv kernels (B of kernel size 1); "
                f"only Linear, Conv1D, Embedding and Conv1d/2d/3d LoRA is supported")
    if a[0] != b[1]:
        return f"rank mismatch: A is {tuple(a)} (r={a[0]}) but B is {tuple(b)} (r={b[1]})"
    want = cfg.rank_for(module)
    if a[0] != want:
        return f"rank {a[0]} in the weights but adapter_config.json gives r={want} (r / rank_pattern); fix the config"
    if cfg.targets(module) is False and not cfg.tied_head(module):
        return f"not matched by target_modules {cfg.target_modules!r} (or excluded); PEFT would ignore its weights"
    return None


def _check_bias_magnitude(cfg: LoraAdapterConfig, kind: str, shapes: dict) -> str | None:
    """What is wrong with a module's lora_B.bias / DoRA magnitude against the config, or None."""
    out = shapes["B"][0]
    if "bias" in shapes:
        if not cfg.lora_bias:
            return "has lora_B.bias but lora_bias is false; PEFT would ignore it; set \"lora_bias\": true"
        if tuple(shapes["bias"]) != (out,):
            return f"lora_B.bias has shape {tuple(shapes['bias'])}, expected ({out},)"
    elif cfg.lora_bias and kind == "linear" and cfg.raw.get("init_lora_weights", True) is not True:
        return "lora_bias is true but lora_B.bias is missing, and PEFT would initialise it non-zero"
    if kind == "embedding" and cfg.lora_bias:
        return "lora_bias is not supported for embeddings by PEFT; set \"lora_bias\": false"
    if "magnitude" in shapes:
        if not cfg.use_dora:
            return "has lora_magnitude_vector but use_dora is false; set \"use_dora\": true"
        if tuple(shapes["magnitude"]) != (out,):
            return f"lora_magnitude_vector has shape {tuple(shapes['magnitude'])}, expected ({out},)"
    elif cfg.use_dora:
        return "use_dora is true but lora_magnitude_vector is missing"
    return None


def _check_module(cfg: LoraAdapterConfig, where: Path, module: str, kind: str, shapes: dict, dtypes: dict) -> None:
    """One module's saved tensors (shapes and dtypes from the header) against the config."""
    problem = _check_factors(cfg, module, shapes, dtypes) or _check_bias_magnitude(cfg, kind, shapes)
    if problem:
        raise AdapterError(f"{where}: {module}: {problem}")


# ----------------------------------------------------------------------------- write


def _most_common(values) -> object:
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))  # ties -> the smaller value


def _alpha_for_scaling(scaling: float, r: int) -> float:
    """An alpha with alpha / r == scaling in floating point (exact when one exists nearby)."""
    alpha = scaling * r
    if alpha / r != scaling:
        for toward in (math.inf, -math.inf):
            a = alpha
            for _ in range(4):
                a = math.nextafter(a, toward)
                if a / r == scaling:
                    alpha = a
                    break
            if alpha / r == scaling:
                break
    return int(alpha) if float(alpha).is_integer() and abs(alpha) < 2**53 else alpha


def config_for_ranks(ranks: Mapping[str, int], scalings: Mapping[str, float] | float = 1.0) -> dict:
    """r / lora_alpha / rank_pattern / alpha_pattern giving each module its rank and
    scale (alpha / r, no rsLoRA). r is the most common rank; patterns use full names."""
    if not ranks:
        raise AdapterError("no LoRA modules to write; an adapter needs at least one module")
    sc = {m: (scalings if isinstance(scalings, (int, float)) else scalings[m]) for m in ranks}
    alphas = {m: _alpha_for_scaling(float(sc[m]), ranks[m]) for m in ranks}
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
    }


_COMPUTED = ("peft_type", "bias", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules",
             "lora_bias", "use_dora", "use_rslora", "modules_to_save", "trainable_token_indices")
_NAME = re.compile(r"[^.\s]+(\.[^.\s]+)*")


def _module_problem(name: str, m: LoraModule) -> str | None:
    """What makes LoRA module `name` unwritable as a PEFT adapter module, or None."""
    if name != m.module:
        return f"dict key differs from module.module {m.module!r}"
    parts = name.split(".") if _NAME.fullmatch(name) else [""]
    if any(p.startswith("lora_") or p in ("", "base_layer") for p in parts):
        return "not a valid module name (dotted, no empty parts, no lora_* or base_layer parts)"
    if m.kind not in ("linear", "embedding"):
        return f"kind {m.kind!r}; use 'linear' or 'embedding'"
    if m.A.dim() != 2 or m.B.dim() != 2 or m.A.shape[0] != m.B.shape[1] or m.A.shape[0] < 1:
        return f"A {tuple(m.A.shape)} and B {tuple(m.B.shape)} must be (r, in) and (out, r) with r >= 1"
    for slot, t in (("A", m.A), ("B", m.B), ("bias", m.bias), ("magnitude", m.magnitude)):
        if t is not None and not t.is_floating_point():
            return f"{slot} has dtype {t.dtype}; use a floating-point dtype"
    for slot, t in (("bias", m.bias), ("magnitude", m.magnitude)):
        if t is not None and tuple(t.shape) != (m.B.shape[0],):
            return f"{slot} has shape {tuple(t.shape)}, expected ({m.B.shape[0]},)"
    if m.kind == "embedding" and m.bias is not None:
        return "PEFT does not support lora_bias on embeddings; drop the bias"
    if not math.isfinite(m.scaling):
        return f"scaling {m.scaling} is not finite"
    return None


def _validate_modules(modules: Mapping[str, LoraModule], full_tensors: Mapping[str, torch.Tensor]) -> None:
    for name, m in modules.items():
        problem = _module_problem(name, m)
        if problem:
            raise AdapterError(f"LoRA module {name!r}: {problem}")
    for name, t in full_tensors.items():
        if not _NAME.fullmatch(name) or "." not in name:
            raise AdapterError(f"full tensor {name!r}: expected a dotted tensor name like 'classifier.weight'")
        if not isinstance(t, torch.Tensor):
            raise AdapterError(f"full tensor {name!r}: not a tensor")


def write_adapter(
    out_dir: str | Path,
    modules: Mapping[str, LoraModule],
    *,
    full_tensors: Mapping[str, torch.Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    fan_in_fan_out: bool = False,
    extra_config: Mapping | None = None,
    overwrite: bool = False,
    inputs: Iterable[Path] = (),
    target_parameters: Mapping[str, ParamLora] | None = None,
    bias_tensors: Mapping[str, torch.Tensor] | None = None,
    copy_files: tuple[Path, Iterable[str]] | None = None,
    trainable_tokens: Mapping[str, tuple[Sequence[int], torch.Tensor]] | None = None,
) -> LoraAdapterConfig:
    """Write a PEFT LoRA adapter directory atomically; returns its parsed config.

    `full_tensors` ({base tensor name: tensor}) are saved whole; their modules go into
    modules_to_save. `extra_config` adds/overrides non-computed config fields. `target_parameters`
    ({parameter name: ParamLora}): LoRAs on raw parameters. `bias_tensors` ({"<module>.bias":
    tensor}): PEFT ``bias: "all"`` values. `copy_files`: (directory, file names) to copy beside.
    `trainable_tokens` ({embedding module: (token ids, rows (len(ids), dim))}): PEFT's
    trainable_token_indices, rows that replace the base's (``<module>.token_adapter.
    trainable_tokens_delta``). Everything is validated before the first byte is written.
    """
    full_tensors = dict(full_tensors or {})
    params = dict(target_parameters or {})
    bias_tensors = dict(bias_tensors or {})
    tokens = dict(trainable_tokens or {})
    mts, use_dora, lora_bias = _check_written(modules, full_tensors, params, bias_tensors)
    _validate_tokens(tokens, modules, mts)
    cfg = {
        "peft_type": "LORA", **_ranks_config(modules, params), "target_modules": sorted(modules),
        "fan_in_fan_out": bool(fan_in_fan_out), "use_rslora": False, "use_dora": bool(any(use_dora)),
        "lora_bias": lora_bias, "modules_to_save": mts, "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path, "bias": "all" if bias_tensors else "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,  # zero-init for anything not in the file (e.g. absent biases)
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "revision": None,
    }
    _add_extra_config(cfg, extra_config, params)
    if tokens:
        cfg["trainable_token_indices"] = {m: [int(i) for i in ids] for m, (ids, _) in sorted(tokens.items())}
    parsed = _settle_patterns(cfg, modules)
    sd = _written_tensors(modules, full_tensors, params, bias_tensors)
    sd.update({PREFIX + m + TOKENS_DELTA: rows for m, (_, rows) in tokens.items()})
    with ShardedWriter(out_dir, shard_size=None, overwrite=overwrite, basename="adapter_model",
                       metadata={"format": "pt"}, inputs=inputs) as w:
        for key in sorted(sd):
            w.add(key, sd[key].detach().contiguous())
        w.write_json(CONFIG_NAME, cfg)
        if copy_files is not None:
            w.copy_files(Path(copy_files[0]), list(copy_files[1]))
    return parsed


def _check_written(modules: Mapping[str, LoraModule], full_tensors: Mapping[str, torch.Tensor],
                   params: Mapping[str, ParamLora], bias_tensors: Mapping[str, torch.Tensor],
                   ) -> tuple[list[str] | None, list[bool], bool]:
    """Validate what write_adapter is given; (modules_to_save, DoRA flags, lora_bias)."""
    _validate_modules(modules, full_tensors)
    _validate_extras(modules, params, bias_tensors)
    mts = sorted({n.rsplit(".", 1)[0] for n in full_tensors}) or None
    for name in modules:
        if _in_modules_to_save(name, mts):
            raise AdapterError(
                f"LoRA module {name!r} is inside a modules_to_save module ({mts}); PEFT would ignore its LoRA weights"
            )
    use_dora = [m.magnitude is not None for m in modules.values()]
    if any(use_dora) and not all(use_dora):
        raise AdapterError("some modules have a DoRA magnitude and some do not; PEFT needs all or none")
    lora_bias = any(m.bias is not None for m in modules.values())
    if lora_bias and any(use_dora):
        raise AdapterError("PEFT does not support lora_bias together with DoRA; drop the biases or the magnitudes")
    return mts, use_dora, lora_bias


def _validate_tokens(tokens: Mapping[str, tuple[Sequence[int], torch.Tensor]], modules: Mapping[str, LoraModule],
                     mts: list[str] | None) -> None:
    """Trainable tokens: distinct non-negative ids, one (dim,) row each, on a module that is
    neither a LoRA nor saved whole (PEFT wraps a layer one way)."""
    for name, (ids, rows) in tokens.items():
        if not _NAME.fullmatch(name):
            raise AdapterError(f"trainable tokens on {name!r}: expected a module name like 'embed_tokens'")
        if name in modules or _in_modules_to_save(name, mts):
            raise AdapterError(f"trainable tokens on {name!r}, which is also a LoRA module or saved whole; "
                               "PEFT wraps a layer one way")
        if not ids or len(set(ids)) != len(ids) or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise AdapterError(f"trainable tokens on {name!r}: token ids must be distinct non-negative integers")
        if rows.dim() != 2 or rows.shape[0] != len(ids) or not rows.is_floating_point():
            raise AdapterError(f"trainable tokens on {name!r}: rows {tuple(rows.shape)} for {len(ids)} ids; "
                               "expected one floating-point row per id")


def _ranks_config(modules: Mapping[str, LoraModule], params: Mapping[str, ParamLora]) -> dict:
    """config_for_ranks over LoRA modules and target parameters together."""
    ranks = {**{n: m.rank for n, m in modules.items()}, **{n: p.rank for n, p in params.items()}}
    scalings = {**{n: m.scaling for n, m in modules.items()}, **{n: p.scaling for n, p in params.items()}}
    return config_for_ranks(ranks, scalings)


def _add_extra_config(cfg: dict, extra_config: Mapping | None, params: Mapping[str, ParamLora]) -> None:
    for k, v in (extra_config or {}).items():
        if k in _COMPUTED:
            raise AdapterError(f"extra_config may not set {k!r}; it is derived from the modules")
        cfg[k] = v
    try:
        json.dumps(cfg)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"adapter config is not JSON-serialisable ({e}); pass plain values in "
                           "extra_config") from None
    if params:
        cfg["target_parameters"] = sorted(params)


def _settle_patterns(cfg: dict, modules: Mapping[str, LoraModule]) -> LoraAdapterConfig:
    """Parse the config being written, anchoring its pattern keys when a plain full name would
    also match another module (a dotted suffix of its name): every module gets exactly its rank."""
    alphas = {n: _alpha_for_scaling(float(m.scaling), m.rank) for n, m in modules.items()}
    parsed = _parse_written(cfg)
    if not _resolves(parsed, modules, alphas):
        # A full name that is also a dotted suffix of another module's name would
        # match both; anchored, escaped keys match exactly one module.
        for key in ("rank_pattern", "alpha_pattern"):
            cfg[key] = {"^" + re.escape(m): v for m, v in cfg[key].items()}
        parsed = _parse_written(cfg)
        if not _resolves(parsed, modules, alphas):
            raise AdapterError("cannot express the per-module ranks/scales in rank_pattern/alpha_pattern")
    return parsed


def _written_tensors(modules: Mapping[str, LoraModule], full_tensors: Mapping[str, torch.Tensor],
                     params: Mapping[str, ParamLora], bias_tensors: Mapping[str, torch.Tensor]) -> dict:
    """Every tensor of the adapter file under its saved key."""
    sd = adapter_state_dict(modules, full_tensors)
    for p in params.values():
        sd.update(p.keys())
    for name, t in bias_tensors.items():  # PEFT keys a wrapped module's own bias under base_layer
        owner = name.rsplit(".", 1)[0]
        sd[PREFIX + (f"{owner}.base_layer.bias" if owner in modules else name)] = t
    if any(m.bias is not None for m in modules.values()):  # PEFT gives every linear LoRA a bias: explicit zeros
        for m in modules.values():
            key = module_key_prefix(m.module) + ".lora_B.bias"
            if m.kind == "linear" and key not in sd:
                sd[key] = torch.zeros(m.B.shape[0], dtype=m.B.dtype)  # (out,)
    return sd


def _parse_written(cfg: dict) -> LoraAdapterConfig:
    """parse_adapter_config of a config being written (target_parameters, which the reader
    refuses, checked by write_adapter itself)."""
    return parse_adapter_config({k: v for k, v in cfg.items() if k != "target_parameters"},
                                "adapter config being written", allow=("trainable_token_indices",))


def _validate_extras(modules: Mapping[str, LoraModule], params: Mapping[str, ParamLora],
                     bias_tensors: Mapping[str, torch.Tensor]) -> None:
    for name, p in params.items():
        if name != p.param or not _NAME.fullmatch(name) or "." not in name:
            raise AdapterError(f"target parameter {name!r}: expected a dotted parameter name equal to its param")
        if p.A.dim() != 2 or p.B.dim() != 2 or p.A.shape[0] != p.B.shape[1] or p.A.shape[0] % max(p.experts, 1):
            raise AdapterError(f"target parameter {name!r}: A {tuple(p.A.shape)} / B {tuple(p.B.shape)} are not "
                               f"(r * {p.experts}, in) / (out, r * {p.experts})")
    if params and any(m.bias is not None for m in modules.values()):
        raise AdapterError("PEFT's target_parameters LoRA does not support lora_bias; drop the biases")
    if bias_tensors and any(m.bias is not None for m in modules.values()):
        raise AdapterError("bias tensors (bias='all') and lora_B.bias cannot be combined; keep one")
    for name in bias_tensors:
        if not name.endswith(".bias") or not _NAME.fullmatch(name):
            raise AdapterError(f"bias tensor {name!r}: expected a name like 'encoder.dense.bias'")


def _resolves(cfg: LoraAdapterConfig, modules: Mapping[str, LoraModule], alphas: Mapping[str, float]) -> bool:
    """Does PEFT's pattern lookup give every module exactly its rank and alpha?"""
    return all(
        cfg.rank_for(n) == m.rank and cfg.alpha_for(n) == alphas[n] and cfg.targets(n) is not False
        for n, m in modules.items()
    )
