"""extract-lora: a fine-tune's weight delta, compressed into a PEFT LoRA adapter.

Three phases, each consuming the previous one's output and never editing it:

  plan       from the headers (and a few small tensors): pair base↔ft tensors, the model's own
             name and layer kind of each (surgery.core.names: transformers may rename or fuse
             checkpoint tensors on load, and PEFT keys adapters by the in-memory names), what
             becomes a LoRA / an expert LoRA / is saved whole / rides as a bias / is skipped,
             and every PEFT constraint settled (no lora_bias beside an Embedding or expert LoRA;
             task heads PEFT saves whole; modules saved whole with every tensor; tied embeddings)
             before the first SVD.
  decompose  one tensor (or one fused expert stack) at a time, in base shard order: read the
             delta in fp32, turn it into a row (LoRA factors + report row, a whole tensor, a bias
             delta, or a skip with its reason). The LoRA math is a pure function of the delta.
  assemble   rows -> LoRA modules (bias deltas on lora_B.bias, or PEFT bias="all"), expert LoRAs
             (target_parameters), whole tensors (a tied head beside its embedding), the config
             PEFT and AutoPeftModel need (task_type, an absolute base_model_name_or_path),
             notes and warnings, the adapter directory.

Orientation (PEFT's delta is scale * B @ A, transposed where the layout asks):
  Linear    W (out, in):   Δ ≈ B @ A               A (r, in),    B (out, r)
  Conv1D    W (in, out):   Δᵀ ≈ B @ A              fan_in_fan_out: true
  Embedding W (vocab, d):  Δᵀ ≈ B @ A              lora_embedding_A (r, vocab), _B (d, r)
  Experts   W (E, d1, d2): Δ_e ≈ B_e @ A_e         target_parameters (peft_format.ParamLora)
  Rows      W (vocab, d):  W[i] = W_ft[i], i ∈ I    trainable_token_indices (embeddings "rows")
Every module gets scale exactly 1 (lora_alpha = r, rank_pattern/alpha_pattern).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.core.hf import parse_dtype, resolve_device, torch_threads
from surgery.core.layers import module_filter, tensor_kinds
from surgery.core.lowrank import (
    RowSpectrum,
    allocate_budget,
    frob_sq,
    lora_factors,
    rank_budget_params,
    rank_for_energy,
    truncated_svd,
)
from surgery.core.names import NameMap, name_map
from surgery.core.peft_format import LoraModule, ParamLora, write_adapter
from surgery.core.tensors import all_finite, check_fits, require_finite
from surgery.errors import CheckpointError, OptionError, SurgeryError
from surgery.io import CheckpointIndex, LazyReader, check_output_path, escape_name, open_checkpoint
from surgery.io.hub import is_hub_id, resolve_model
from surgery.options.extract import ExtractOptions, budget_rank, parse_budget
from surgery.report.cards import write_card
from surgery.report.checks import capped_energy_warning, rounding_delta_warning

Progress = Callable[[str, int, int], None]
_ROW_BLOCK = 1 << 20  # elements per block when reading a delta
SIZE_WARNING_SHARE = 0.10  # an adapter above this share of the model's parameters gets a warning
#: modules PEFT's task classes add to modules_to_save themselves (peft_model.py), and so expect whole
TASK_MODULES_TO_SAVE = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                        "QUESTION_ANS": ("qa_outputs",)}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model")


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ModuleReport:
    module: str  # the model's own name (as in the adapter)
    kind: str  # linear | conv1d | embedding | experts
    shape: tuple[int, ...]  # the matrix decomposed, (out, in) orientation; experts: (E, out, in)
    rank: int
    params: int
    delta_norm: float  # ‖Δ‖_F
    rel_change: float  # ‖Δ‖_F / ‖W‖_F
    rel_error: float  # ‖Δ − B A‖_F / ‖Δ‖_F, of the factors as stored
    energy_kept: float
    method: str
    note: str = ""
    rows: int = 0  # method "rows": how many whole rows (trainable tokens) stand for the delta


@dataclass
class ExtractResult:
    """What extract_lora wrote, module by module, and why anything was left out.

    `skipped` rows carry the tensor (checkpoint name), why, and, for a delta, its norm and its
    `share` of the whole delta (‖Δ_tensor‖² / ‖Δ_total‖²); `left_out_share` sums them.
    `warnings` says when the adapter is large (over 10 % of the model's parameters) and why."""

    out: Path
    modules: list[ModuleReport]
    full: list[str] = field(default_factory=list)  # tensors saved whole (modules_to_save), model names
    skipped: list[dict] = field(default_factory=list)  # deltas not in the adapter, with why
    notes: list[str] = field(default_factory=list)
    adapter_params: int = 0
    full_params: int = 0
    model_params: int = 0
    overall_rel_error: float = 0.0
    seconds: float = 0.0
    options: dict = field(default_factory=dict)
    bias_params: int = 0  # bias values written with PEFT's bias="all"
    left_out_share: float = 0.0
    task_type: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class TensorPlan:
    """One base↔ft tensor pair (or one fused parameter) and what to do with it."""

    name: str  # checkpoint name; a fused parameter: its model name
    kind: str  # layer kind (surgery.core.layers), or "experts" (a 3-D stack of expert matrices)
    action: str  # "lora" | "experts" | "rows" | "full" | "bias" | "skip" | "check" (non-float: must be equal)
    why: str = ""  # skip: the reason; full: why it is whole
    grown: bool = False  # vocabulary growth: no delta, saved whole
    instead_of_lora: bool = False  # a LoRA candidate saved whole to settle a conflict
    param: str = ""  # the model's name for it ("" when it is `name`)
    sources: tuple[str, ...] = ()  # a fused parameter: the checkpoint tensors it is built from
    always: bool = False  # saved whole even if unchanged: its module is saved whole

    @property
    def target(self) -> str:
        """The model's own name (what the adapter keys)."""
        return self.param or self.name

    @property
    def module(self) -> str:
        return self.target.rsplit(".", 1)[0]


@dataclass(frozen=True)
class ExtractPlan:
    tensors: tuple[TensorPlan, ...]  # in base shard order
    model_params: int
    budget_params: int | None  # the budget policy's parameter count
    cap: int | None  # rank cap of every SVD (None: all singular values)
    task_type: str | None = None
    bias_form: str = "lora"  # how bias deltas are written: "lora" | "all" | "none"
    tied: Mapping[str, str] = field(default_factory=dict)  # tied head -> its embedding (model names)
    notes: tuple[str, ...] = ()
    experts: Mapping[str, tuple[int, bool]] = field(default_factory=dict)  # param -> (depth, is_transposed)
    config: Mapping[str, Any] | None = None

    @property
    def lora(self) -> list[TensorPlan]:
        return [p for p in self.tensors if p.action == "lora"]


class _Pair:
    """The two open checkpoints; reads deltas a block of rows at a time."""

    def __init__(self, base_idx: CheckpointIndex, ft_idx: CheckpointIndex, rb: LazyReader, rf: LazyReader,
                 names: NameMap | None = None):
        self.base_idx, self.ft_idx, self.rb, self.rf = base_idx, ft_idx, rb, rf
        self.names = names

    def _fused(self, p: TensorPlan, reader: LazyReader) -> torch.Tensor:
        fusion = self.names.fusion_of(p.name) if self.names is not None else None
        if fusion is None:
            raise CheckpointError(f"{p.name}: no checkpoint tensors build it")
        return fusion.combine(reader.get)[p.name]

    def ft(self, name: str | TensorPlan) -> torch.Tensor:
        if isinstance(name, TensorPlan):
            if name.sources:
                return _finite(name.name, self._fused(name, self.rf), "fine-tune")
            name = name.name
        return _finite(name, self.rf.get(name), "fine-tune")

    def differs(self, name: str | TensorPlan) -> bool:
        """Whether FT's tensor differs from BASE's (NaN counts as a difference), block by block."""
        if isinstance(name, TensorPlan):
            if name.sources:
                return not torch.equal(self._fused(name, self.rb), self._fused(name, self.rf))
            name = name.name
        shape = self.base_idx.tensors[name].shape
        if len(shape) == 0:
            return not torch.equal(self.rb.get(name), self.rf.get(name))
        step = max(1, _ROW_BLOCK // max(1, math.prod(shape[1:])))
        return any(not torch.equal(self.rb.get_rows(name, i, i + step), self.rf.get_rows(name, i, i + step))
                   for i in range(0, shape[0], step))

    def delta(self, name: str | TensorPlan) -> tuple[torch.Tensor, float, float]:
        """(Δ in fp32, ‖Δ‖², ‖W‖²), read a block of rows at a time from both files, so memory
        is Δ plus two small blocks. Finiteness is read off the norms (NaN/Inf propagate into
        them), so no extra pass over the data is needed. A fused parameter is built whole."""
        if isinstance(name, TensorPlan):
            if name.sources:
                wb, wf = self._fused(name, self.rb), self._fused(name, self.rf)
                return self._checked(name.name, wf.float() - wb.float(), _sq_norm(wb.float()))
            name = name.name
        shape = self.base_idx.tensors[name].shape
        d = torch.empty(shape, dtype=torch.float32)
        wsq = 0.0
        if len(shape) == 0:
            d.copy_(self.rf.get(name).float() - self.rb.get(name).float())
            wsq = float(self.rb.get(name).float()) ** 2
        else:
            step = max(1, _ROW_BLOCK // max(1, math.prod(shape[1:])))
            for i in range(0, shape[0], step):
                wb, wf = self.rb.get_rows(name, i, i + step), self.rf.get_rows(name, i, i + step)
                torch.sub(wf.float(), wb.float(), out=d[i : i + step])
                wsq += _sq_norm_fp32(wb)  # only feeds the report's relative change
        return self._checked(name, d, wsq)

    def _checked(self, name: str, d: torch.Tensor, wsq: float) -> tuple[torch.Tensor, float, float]:
        dsq = _sq_norm(d)  # fp64: it sets the reported errors
        if not (math.isfinite(dsq) and math.isfinite(wsq)):
            if name in self.base_idx.tensors:
                _finite(name, self.rb.get(name), "base")
                _finite(name, self.rf.get(name), "fine-tune")
            raise CheckpointError(f"{name}: the delta is not finite (NaN/Inf in a checkpoint, or values too "
                                  "large for fp32)")
        return d, dsq, wsq


def _finite(name: str, w: torch.Tensor, who: str) -> torch.Tensor:
    if not all_finite(w):
        raise CheckpointError(f"{name}: non-finite values (NaN/Inf) in the {who} checkpoint")
    return w


# --- pairing


_BUFFER_LEAVES = ("position_ids", "token_type_ids")


def _not_weights(names: list[str], idx: CheckpointIndex, nm: NameMap) -> list[str]:
    """Of tensors present on one side only, the non-persistent buffers (int position_ids and the
    like, which older transformers saved and newer ones drop): not weights, left out."""
    buffers: set[str] = set()
    if nm.model is not None:
        persistent = set(nm.model.state_dict())
        buffers = {n for n, _ in nm.model.named_buffers() if n not in persistent}
    return [n for n in names if not idx.tensors[n].dtype.is_floating_point
            and (n.rsplit(".", 1)[-1] in _BUFFER_LEAVES or nm.module_name(n) in buffers)]


def _paired_shapes(base_idx: CheckpointIndex, ft_idx: CheckpointIndex, kinds: Mapping[str, str],
                   nm: NameMap) -> tuple[set[str], set[str], list[str]]:
    """Check that base and fine-tune hold the same tensors and shapes. Returns the names whose
    vocabulary grew (the only shape change that can be extracted), the one-sided buffers to leave
    out, and notes about them."""
    b, f = base_idx.tensors, ft_idx.tensors
    missing, extra = [n for n in b if n not in f], [n for n in f if n not in b]
    ignored = set(_not_weights(missing, base_idx, nm)) | set(_not_weights(extra, ft_idx, nm))
    missing, extra = [n for n in missing if n not in ignored], [n for n in extra if n not in ignored]
    if missing or extra:
        which = f"missing from FT: {missing[:3]}" if missing else f"only in FT: {extra[:3]}"
        raise CheckpointError(
            f"base and fine-tune have different tensors ({which}{' …' if len(missing or extra) > 3 else ''}); "
            "they must share an architecture"
        )
    notes = [f"{n}: only in {'BASE' if n in b else 'FT'}; a non-persistent buffer, not a weight: left out"
             for n in sorted(ignored)]
    grown = set()
    for name, bi in b.items():
        if name in ignored or bi.shape == f[name].shape:
            continue
        fi, kind = f[name], kinds[name]
        vocab_growth = (
            (kind == "embedding" or (kind == "linear" and nm.module_name(name).endswith("lm_head.weight")))
            and len(bi.shape) == 2 and bi.shape[1] == fi.shape[1] and fi.shape[0] > bi.shape[0]
        )
        if not vocab_growth or any(name in fu.sources for fu in nm.fusions.values()):
            raise CheckpointError(
                f"{name}: shape {tuple(bi.shape)} in base but {tuple(fi.shape)} in fine-tune; "
                "only vocabulary growth (more embedding rows) can be extracted"
            )
        grown.add(name)
    return grown, ignored, notes


# --- one tensor


_EXCLUDED = "excluded by include/exclude"
_GREW = "vocabulary grew: saved whole"


def _tensor_plan(name: str, kind: str, floating: bool, grown: bool, selected: bool,
                 opts: ExtractOptions, param: str = "") -> TensorPlan:
    """What to do with one tensor, from its kind and the options alone (conflicts come later)."""
    def plan(action: str, why: str = "", **kw: Any) -> TensorPlan:
        return TensorPlan(name, kind, action, why, param=param if param != name else "", **kw)

    if not floating:
        return plan("check")
    if kind in ("linear", "conv1d"):
        if not selected:
            return plan("skip", _EXCLUDED)
        return plan("full", _GREW, grown=True) if grown else plan("lora")
    if kind == "embedding":
        if not selected or opts.embeddings == "skip":
            return plan("skip", "embeddings='skip'" if selected else _EXCLUDED)
        if grown or opts.embeddings == "full":
            return plan("full", _GREW if grown else "embeddings='full'", grown=grown)
        return plan("rows" if opts.embeddings == "rows" else "lora")
    if kind == "bias":
        return plan("bias") if selected else plan("skip", _EXCLUDED)
    if kind != "norm":  # buffers and other float tensors
        return plan("skip", f"{kind} tensor")
    if not selected:
        return plan("skip", _EXCLUDED)
    if opts.effective_other_deltas == "skip":
        return plan("skip", "serving_safe (no modules_to_save)" if opts.serving_safe else "other_deltas='skip'")
    return plan("full")


def _fusion_plans(nm: NameMap, keep: Callable[[str, str], bool], opts: ExtractOptions) -> list[TensorPlan]:
    """One plan per parameter that transformers builds from several checkpoint tensors: a 3-D
    stack of experts becomes a target_parameters LoRA; anything else is saved whole."""
    from torch import nn

    plans = []
    for fusion in nm.fusions.values():
        for target in fusion.targets:
            module = target.rsplit(".", 1)[0]
            shape = tuple(nm.model.get_parameter(target).shape) if nm.model is not None else ()
            owner = nm.model.get_submodule(module) if nm.model is not None else None
            kind = "linear" if isinstance(owner, nn.Linear) else "experts" if len(shape) == 3 else "other"
            selected = keep(fusion.sources[0].rsplit(".", 1)[0], module)
            if not selected:
                action, why = "skip", _EXCLUDED
            elif kind == "experts":
                action, why = "experts", ""
            elif kind == "linear":
                action, why = "lora", ""
            elif opts.effective_other_deltas == "skip":
                action, why = "skip", "other_deltas='skip'"
            else:
                action, why = "full", ""
            plans.append(TensorPlan(target, kind, action, why, sources=fusion.sources))
    return plans


def _expert_layout(plans: list[TensorPlan], nm: NameMap) -> dict[str, tuple[int, bool]]:
    """param -> (how many PEFT ParamWrappers nest outside it, is_transposed) for expert LoRAs.

    PEFT wraps a module's targeted parameters in their registration order, the first innermost."""
    experts = {p.target for p in plans if p.action == "experts"}
    out = {}
    for target in experts:
        module, leaf = target.rsplit(".", 1)
        owner = nm.model.get_submodule(module)
        order = [n for n, _ in owner.named_parameters(recurse=False) if f"{module}.{n}" in experts]
        out[target] = (len(order) - 1 - order.index(leaf), bool(getattr(owner, "is_transposed", False)))
    return out


# --- constraints PEFT imposes


def infer_task_type(config: Mapping[str, Any] | None) -> str | None:
    """PEFT's task_type for config.json's first architecture: the transformers Auto class that
    maps the model type to it (AutoModelForCausalLM -> CAUSAL_LM, ...ForSequenceClassification ->
    SEQ_CLS, ...ForTokenClassification -> TOKEN_CLS, ...ForQuestionAnswering -> QUESTION_ANS,
    ...ForSeq2SeqLM -> SEQ_2_SEQ_LM, the bare model -> FEATURE_EXTRACTION); None when unknown.

    Example:
        >>> infer_task_type({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
        'CAUSAL_LM'
    """
    archs = (config or {}).get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else None
    if arch is None:
        return None
    from transformers.models.auto import modeling_auto as ma

    tables = (("CAUSAL_LM", ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
              ("SEQ_CLS", ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
              ("TOKEN_CLS", ma.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
              ("QUESTION_ANS", ma.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
              ("SEQ_2_SEQ_LM", ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
              ("FEATURE_EXTRACTION", ma.MODEL_MAPPING_NAMES))
    for task, table in tables:
        for value in table.values():
            if arch == value or (isinstance(value, (tuple, list)) and arch in value):
                return task
    return None


def _replaced(plans: list[TensorPlan], which: set[str], **change: Any) -> list[TensorPlan]:
    return [dataclasses.replace(p, **change) if p.name in which else p for p in plans]


def _settle_task_heads(plans: list[TensorPlan], task_type: str | None) -> list[TensorPlan]:
    """PEFT's SEQ_CLS / TOKEN_CLS / QUESTION_ANS models add their head (classifier, score,
    qa_outputs: every module whose name ends so) to modules_to_save and then expect its
    tensors in the adapter: those modules are saved whole, changed or not."""
    ends = TASK_MODULES_TO_SAVE.get(task_type or "", ())
    heads = {p.module for p in plans if p.module.endswith(ends)} if ends else set()
    inside = {p.name for p in plans if any(p.module == h or p.module.startswith(h + ".") for h in heads)
              and p.action != "check"}
    why = f"task_type {task_type}: PEFT saves this head whole (modules_to_save)"
    return _replaced(plans, inside, action="full", why=why, always=True, instead_of_lora=False)


def _settle_tied(plans: list[TensorPlan], pair: _Pair, tied: Mapping[str, str], opts: ExtractOptions,
                 ) -> tuple[list[TensorPlan], list[str]]:
    """A changed embedding tied to the output head is saved whole, its head beside it
    (modules_to_save + ensure_weight_tying): PEFT 0.21 loads a tied LoRA right but its
    merge_and_unload applies it twice (once through the embedding, once through the head)."""
    sources = set(tied.values())
    tied_lora = [p for p in plans if p.target in sources and p.action == "lora"]
    changed = {p.name for p in tied_lora if pair.differs(p)}
    if not changed:
        return plans, []
    if opts.serving_safe:
        return plans, [f"{n} is tied to the output head: written as a LoRA (serving_safe); PEFT applies it to the "
                       "input embedding only until merged, and its merge_and_unload applies it twice"
                       for n in sorted(changed)]
    why = "tied to the output head: PEFT's merge_and_unload applies a tied LoRA twice, so it is saved whole"
    return _replaced(plans, changed, action="full", why=why, instead_of_lora=True), []


def _settle_whole_modules(plans: list[TensorPlan], pair: _Pair) -> list[TensorPlan]:
    """PEFT's modules_to_save holds a module's every tensor, so a module with a tensor saved
    whole is saved whole: all its tensors, unchanged ones too, once one of them changed."""
    by_module: dict[str, list[TensorPlan]] = {}
    for p in plans:
        if p.action != "check":
            by_module.setdefault(p.module, []).append(p)
    names: set[str] = set()
    forced: set[str] = set()
    for group in by_module.values():
        if not any(p.action == "full" for p in group) or len(group) == 1:
            continue
        names |= {p.name for p in group}
        if any(p.always for p in group) or any(p.grown or pair.differs(p) for p in group if p.action != "skip"):
            forced |= {p.name for p in group}
    plans = [dataclasses.replace(p, action="full", why=p.why or "its module is saved whole")
             if p.name in names and p.action != "full" else p for p in plans]
    return _replaced(plans, forced, always=True)


_NO_LORA_BIAS = "PEFT cannot combine lora_bias with an embedding LoRA"


def _bias_form(plans: list[TensorPlan], pair: _Pair, opts: ExtractOptions) -> tuple[str, set[str]]:
    """How bias deltas are written ("lora" | "all" | "none") and the embeddings to save whole
    instead of as LoRAs (bias='lora' beside an embedding LoRA: PEFT's lora_bias refuses it)."""
    biases = [p for p in plans if p.action == "bias"]
    if opts.bias == "skip" or not biases:
        return "none", set()
    experts = any(p.action == "experts" for p in plans)
    embeddings = [p for p in plans if p.kind == "embedding" and p.action == "lora"]
    changed_bias = any(pair.differs(p) for p in biases)
    changed_emb = {p.name for p in embeddings if pair.differs(p)} if changed_bias else set()
    if opts.bias == "all":
        return "all", set()
    if opts.bias == "lora":
        if experts and changed_bias:
            raise OptionError("bias='lora': PEFT's expert LoRA (target_parameters) refuses lora_bias; use bias "
                              "'all', 'auto' or 'skip'", field="bias")
        if changed_emb and opts.effective_other_deltas == "skip":
            return "none", set()
        return "lora", changed_emb
    if not (changed_emb or (experts and changed_bias)):
        return "lora", set()
    return ("none" if opts.serving_safe else "all"), set()


def _settle_lora_bias(plans: list[TensorPlan], pair: _Pair, opts: ExtractOptions) -> tuple[list[TensorPlan], str]:
    """Bias deltas ride on lora_B.bias of their module's LoRA (a zero rank-1 LoRA for a module
    whose weight did not change), or go whole with PEFT's bias="all", or are dropped; see
    ExtractOptions.bias. Reads the bias vectors (tiny) and, only when needed, the embeddings."""
    form, whole = _bias_form(plans, pair, opts)
    biases = {p.name for p in plans if p.action == "bias"}
    if form == "none":
        if opts.bias == "skip":
            why = "bias='skip'"
        elif opts.bias == "lora":
            why = f"{_NO_LORA_BIAS}, and nothing is saved whole (other_deltas='skip' / serving_safe)"
        else:
            why = "serving_safe: PEFT's bias='all' is not written and lora_bias cannot sit beside an embedding LoRA"
        return _replaced(plans, biases, action="skip", why=why), form
    plans = _replaced(plans, whole, action="full", instead_of_lora=True,
                      why=f"{_NO_LORA_BIAS}; bias='auto' keeps it a LoRA and writes biases with bias='all'")
    return plans, form


def _keep(opts: ExtractOptions) -> Callable[[str, str], bool]:
    """keep(checkpoint module, model module): include/exclude searched in either name."""
    inc, exc = module_filter(opts.include), module_filter((), opts.exclude)
    return lambda ck, mod: (inc(ck) or inc(mod)) and exc(ck) and exc(mod)


def _base_plans(pair: _Pair, nm: NameMap, opts: ExtractOptions) -> tuple[list[TensorPlan], list[str]]:
    """The plan of every tensor from its kind and the options, before any conflict is settled."""
    base_idx = pair.base_idx
    kinds = tensor_kinds(base_idx, names=None if nm.identity else nm.to_module, model=nm.model)
    grown, ignored, notes = _paired_shapes(base_idx, pair.ft_idx, kinds, nm)
    keep = _keep(opts)
    for pattern in opts.include:
        if not any(re.search(pattern, n.rsplit(".", 1)[0]) or re.search(pattern, nm.module_name(n).rsplit(".", 1)[0])
                   for n in base_idx.tensors):
            raise OptionError(f"include {pattern!r} matches no module of {base_idx.source}", field="include")
    fused = {s for f in nm.fusions.values() for s in f.sources}
    plans = [_tensor_plan(name, kinds[name], t.dtype.is_floating_point, name in grown,
                          keep(name.rsplit(".", 1)[0], nm.module_name(name).rsplit(".", 1)[0]), opts,
                          param=nm.module_name(name))
             for name, t in base_idx.tensors.items() if name not in fused and name not in ignored]
    return plans + _fusion_plans(nm, keep, opts), notes


def _shard_order(plans: list[TensorPlan], pair: _Pair) -> tuple[TensorPlan, ...]:
    """Base shard order; a fused parameter sits where its first checkpoint tensor is."""
    first = {p.name: p.sources[0] if p.sources else p.name for p in plans}
    order = {n: i for i, n in enumerate(pair.rb.order(sorted(set(first.values()))))}
    return tuple(sorted(plans, key=lambda p: order[first[p.name]]))


def plan_extraction(pair: _Pair, opts: ExtractOptions) -> ExtractPlan:
    """Every decision that the headers (and a few small tensors) allow, before any SVD.

    Args:
        pair: the open base and fine-tune checkpoints (its `names` default: built here).
        opts: the validated options.
    Returns:
        ExtractPlan: one TensorPlan per tensor (per fused parameter) in base shard order, the
        budget in parameters (budget policy), the rank cap of every SVD, the task type, how
        bias deltas are written, tied heads and the expert LoRA layout.
    Raises:
        CheckpointError: the checkpoints hold different tensors (beyond non-persistent
            buffers), or shapes differ beyond vocabulary growth.
        OptionError: an include pattern matches no module; nothing is selected for LoRA.

    Example:
        >>> with LazyReader(bi) as rb, LazyReader(fi) as rf:
        ...     plan = plan_extraction(_Pair(bi, fi, rb, rf), ExtractOptions(rank=4))
        >>> {p.action for p in plan.tensors}
        {'lora', 'full', 'bias', 'check'}
    """
    base_idx = pair.base_idx
    if pair.names is None:
        pair.names = name_map(base_idx.config, base_idx.tensors)
    nm = pair.names
    plans, notes = _base_plans(pair, nm, opts)
    if not any(p.action in ("lora", "experts", "rows") for p in plans):
        raise OptionError("no Linear/Conv1D/Embedding weight is selected for LoRA; check include/exclude and "
                          "embeddings")
    task_type = opts.task_type or infer_task_type(base_idx.config)
    tied = {nm.module_name(h).rsplit(".", 1)[0]: nm.module_name(e) for h, e in base_idx.tied.items()}
    plans = _settle_task_heads(plans, task_type)
    plans, tied_notes = _settle_tied(plans, pair, tied, opts)
    plans, form = _settle_lora_bias(plans, pair, opts)
    plans = _settle_whole_modules(plans, pair)
    budget = _budget_params(opts.budget, plans, pair)
    return ExtractPlan(_shard_order(plans, pair), base_idx.total_params, budget, opts.rank_cap, task_type, form,
                       tied, tuple(notes + tied_notes), _expert_layout(plans, nm), base_idx.config)


# ----------------------------------------------------------------------------- decompose


@dataclass(frozen=True)
class Row:
    """What one tensor contributes to the adapter and the report."""

    name: str
    lora: LoraModule | None = None
    report: ModuleReport | None = None
    whole: torch.Tensor | None = None  # saved whole (modules_to_save)
    bias: torch.Tensor | None = None  # a bias delta (fp32) for lora_B.bias, or the FT bias for bias="all"
    skipped: dict | None = None
    note: str = ""
    sq_err: float = 0.0  # this LoRA's ‖Δ − B A‖², for the overall error
    sq_tot: float = 0.0  # this LoRA's ‖Δ‖²
    target: str = ""  # the model's name of the tensor ("" = name)
    param: ParamLora | None = None  # an expert LoRA (target_parameters)
    delta_sq: float = 0.0  # ‖Δ‖² of this tensor, whatever became of it (for the left-out share)
    tokens: tuple[list[int], torch.Tensor] | None = None  # embedding rows (ids ascending, the FT's rows)


@dataclass(frozen=True)
class _SVDSettings:
    method: str
    niter: int
    seed: int
    device: torch.device

    def kw(self) -> dict:
        return dict(method=self.method, niter=self.niter, seed=self.seed, device=self.device)


def _sq_norm(t: torch.Tensor) -> float:
    """‖t‖²_F accumulated in fp64, a block at a time."""
    if t.numel() == 0:  # an empty tensor: no rows to reshape into
        return 0.0
    return frob_sq(t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1))


def _sq_norm_fp32(t: torch.Tensor) -> float:
    """‖t‖²_F in fp32 blocks (no full-size upcast copy); for reports, not for error bounds."""
    flat = t.reshape(-1)
    step = 1 << 18
    return sum(float(torch.linalg.vector_norm(flat[i : i + step].float())) ** 2 for i in range(0, flat.numel(), step))


def _cast_sq_error(B: torch.Tensor, A: torch.Tensor, Bq: torch.Tensor, Aq: torch.Tensor) -> float:
    """‖B A − Bq Aq‖²_F (what casting the factors costs), from r x r Gram matrices in fp64.

    With X = [B, Bq] (m, 2r) and Y = [A; −Aq] (2r, n): ‖X Y‖² = tr((XᵀX)(Y Yᵀ)), so
    no (m, n) product is formed. The SVD residual R = M − BA is orthogonal to B's
    columns and A's rows, so ‖M − Bq Aq‖² = ‖R‖² + this, up to second-order terms.
    """
    X = torch.cat([B, Bq], dim=1).double()  # (m, 2r)
    Y = torch.cat([A, -Aq], dim=0).double()  # (2r, n)
    return max(0.0, float(torch.trace((X.T @ X) @ (Y @ Y.T))))


def _orient(delta: torch.Tensor, kind: str) -> torch.Tensor:
    """The matrix that B @ A approximates, from a delta in storage layout."""
    return delta.T if kind in ("conv1d", "embedding") else delta


def _factors(M: torch.Tensor, k: int | None, total: float, opts: ExtractOptions, out_dtype: torch.dtype,
             svd: _SVDSettings, name: str, budget_rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float, Any]:
    """LoRA factors (A (r, in), B (out, r)) of one matrix at the policy's rank, the squared error of
    the factors as stored, and the SVD result."""
    res = truncated_svd(M, k, name=name, total_energy=total, **svd.kw())
    r = res.k
    if opts.energy is not None:
        r = max(1, res.rank_for_energy(float(opts.energy)))
    if budget_rank is not None:
        r = min(budget_rank, res.k)
    A32, B32 = lora_factors(res, r)  # (r, in), (out, r)
    A, B = A32.to(out_dtype), B32.to(out_dtype)
    err = res.sq_error(r)
    if out_dtype != torch.float32:
        err += _cast_sq_error(B32, A32, B.float(), A.float())
    return A, B, err, res


def decompose_lora(p: TensorPlan, d: torch.Tensor, total: float, wsq: float, k: int | None,
                   opts: ExtractOptions, out_dtype: torch.dtype, svd: _SVDSettings,
                   budget_rank: int | None = None) -> Row:
    """One delta -> LoRA factors and its report row (a pure function of the delta).

    k is the number of singular triplets to compute; the rank kept is k (fixed rank), the
    smallest reaching opts.energy, or budget_rank. The error reported is that of the factors
    as stored (the SVD's exact truncation error plus what the cast to out_dtype costs)."""
    name = p.name
    if total == 0.0:
        return Row(name, skipped={"tensor": name, "why": "delta is zero"}, target=p.target)
    if budget_rank == 0:
        return Row(name, skipped={"tensor": name, "why": "budget gave rank 0", "delta_norm": math.sqrt(total)},
                   sq_err=total, sq_tot=total, target=p.target, delta_sq=total)
    M = _orient(d, p.kind)  # (out, in)
    A, B, err, res = _factors(M, k, total, opts, out_dtype, svd, name, budget_rank)
    r = A.shape[0]
    note = ""
    if opts.energy is not None and res.energy_kept(r) < float(opts.energy):
        note = f"energy {res.energy_kept(r):.3f} < {opts.energy} at the max rank {r}"
    wnorm = math.sqrt(wsq)
    report = ModuleReport(
        p.module, p.kind, (int(M.shape[0]), int(M.shape[1])), r, A.numel() + B.numel(), math.sqrt(total),
        math.sqrt(total) / wnorm if wnorm else math.inf, math.sqrt(err / total), 1.0 - err / total, res.method, note,
    )
    kind = "embedding" if p.kind == "embedding" else "linear"
    module = LoraModule(p.module, kind, A.contiguous(), B.contiguous(), scaling=1.0)
    return Row(name, lora=module, report=report, sq_err=err, sq_tot=total, target=p.target, delta_sq=total)


def pack_experts(factors: list[tuple[torch.Tensor, torch.Tensor]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert factors [(A_e (r_e, in), B_e (out, r_e))] -> PEFT ParamWrapper's A (rank * E, in),
    B (out, rank * E): row e * rank + j of A and column j * E + e of B hold expert e's j-th factor
    (zero-padded to `rank`), so that PEFT's einsum gives Δ_e = B_e @ A_e.

    Example:
        >>> A, B = pack_experts([(torch.ones(1, 3), torch.ones(2, 1))] * 4, rank=2)
        >>> A.shape, B.shape
        (torch.Size([8, 3]), torch.Size([2, 8]))
    """
    E = len(factors)
    n_in, n_out = factors[0][0].shape[1], factors[0][1].shape[0]
    dtype = factors[0][0].dtype
    A = torch.zeros(E, rank, n_in, dtype=dtype)  # (E, r, in)
    B = torch.zeros(n_out, rank, E, dtype=dtype)  # (out, r, E)
    for e, (a, b) in enumerate(factors):
        A[e, : a.shape[0]] = a
        B[:, : b.shape[1], e] = b
    return A.reshape(E * rank, n_in).contiguous(), B.reshape(n_out, rank * E).contiguous()


def decompose_experts(p: TensorPlan, d: torch.Tensor, total: float, wsq: float, k: int | None,
                      opts: ExtractOptions, out_dtype: torch.dtype, svd: _SVDSettings, layout: tuple[int, bool],
                      budget_ranks: list[int] | None = None) -> Row:
    """A stack of expert deltas (E, d1, d2) -> one LoRA per expert, packed for PEFT's
    target_parameters (every expert at the largest expert rank, zero-padded)."""
    if total == 0.0:
        return Row(p.name, skipped={"tensor": p.name, "why": "delta is zero"}, target=p.target)
    depth, transposed = layout
    mats = [(d[e].T if transposed else d[e]) for e in range(d.shape[0])]  # (out, in) each
    factors, err, methods = [], 0.0, set()
    for e, M in enumerate(mats):
        te = _sq_norm(M)
        br = None if budget_ranks is None else budget_ranks[e]
        if te == 0.0 or br == 0:
            factors.append((torch.zeros(0, M.shape[1], dtype=out_dtype), torch.zeros(M.shape[0], 0, dtype=out_dtype)))
            err += te
            continue
        A, B, e_err, res = _factors(M, k, te, opts, out_dtype, svd, f"{p.name}[{e}]", br)
        factors.append((A, B))
        err += e_err
        methods.add(res.method)
    rank = max(1, max(a.shape[0] for a, _ in factors))
    A, B = pack_experts(factors, rank)
    param = ParamLora(p.target, A, B, experts=len(mats), depth=depth)
    wnorm = math.sqrt(wsq)
    report = ModuleReport(p.target, "experts", (len(mats), *mats[0].shape), rank, A.numel() + B.numel(),
                          math.sqrt(total), math.sqrt(total) / wnorm if wnorm else math.inf, math.sqrt(err / total),
                          1.0 - err / total, "+".join(sorted(methods)) or "none")
    return Row(p.name, report=report, sq_err=err, sq_tot=total, target=p.target, param=param, delta_sq=total)


def _whole_row(p: TensorPlan, pair: _Pair, out_dtype: torch.dtype | None) -> Row:
    """A tensor saved whole: the fine-tune's, in the adapter dtype (default its own)."""
    note, dsq = "", 0.0
    if p.grown:  # no delta (shapes differ), but saved whole: still checked
        rows_b, rows_f = pair.base_idx.tensors[p.name].shape[0], pair.ft_idx.tensors[p.name].shape[0]
        note = (f"{p.name}: vocabulary grew from {rows_b} to {rows_f} rows; saved whole in modules_to_save — "
                f"call base.resize_token_embeddings({rows_f}) before loading the adapter")
    else:
        d, dsq, _ = pair.delta(p)
        if not d.any() and not p.always:
            skip = {"tensor": p.name, "why": "delta is zero"} if p.instead_of_lora else None
            return Row(p.name, skipped=skip, target=p.target)
        if p.instead_of_lora and d.any():
            note = f"{p.name}: saved whole ({p.why})"
    wf = pair.ft(p)
    return Row(p.name, whole=wf.to(out_dtype or wf.dtype), note=note, target=p.target, delta_sq=dsq)


def _other_row(p: TensorPlan, pair: _Pair, bias_form: str) -> Row:
    """A non-float tensor that must not change, a skipped delta, or a bias delta."""
    if p.action == "check":
        if torch.equal(pair.rb.get(p.name), pair.rf.get(p.name)):
            return Row(p.name)
        return Row(p.name, skipped={"tensor": p.name, "why": "non-float tensor differs; not representable"})
    if p.grown:  # skipped, and no delta to report
        return Row(p.name, skipped={"tensor": p.name, "why": p.why})
    d, dsq, _ = pair.delta(p)
    if not d.any():
        return Row(p.name, target=p.target)
    if p.action == "bias":
        value = pair.ft(p).float() if bias_form == "all" else d  # bias="all" replaces the base's values
        return Row(p.name, bias=value, target=p.target, delta_sq=dsq)
    return Row(p.name, skipped={"tensor": p.name, "why": p.why, "delta_norm": math.sqrt(dsq)}, target=p.target,
               delta_sq=dsq)


def _budget_params(text, plans: Sequence[TensorPlan], pair: _Pair) -> int | None:
    """The budget in parameters: parsed, or for "rN" what rank N on every changed LoRA candidate would
    take (min(N, min(m, n))·(m + n) each; an expert stack E times that), i.e. the size of a uniform
    rank-N extraction, which skips unchanged modules too."""
    if text is None:
        return None
    n = budget_rank(text)
    if n is None:
        return parse_budget(text, pair.base_idx.total_params)
    shapes = [_plan_shape(p, pair) for p in plans if p.action in ("lora", "experts", "rows") and pair.differs(p)]
    return rank_budget_params([(s[-2], s[-1], s[0] if len(s) == 3 else 1) for s in shapes], n)


def _plan_shape(p: TensorPlan, pair: _Pair) -> tuple[int, ...]:
    """The shape of a LoRA candidate: its checkpoint tensor's, or a fused parameter's in the model."""
    if not p.sources:
        return tuple(pair.base_idx.tensors[p.name].shape)
    model = pair.names.model if pair.names is not None else None
    if model is None:
        raise OptionError(f"budget: the shape of fused parameter {escape_name(p.target, 200)} is unknown; give "
                          "the budget as a parameter count", field="budget")
    return tuple(model.get_parameter(p.target).shape)


def _spectra(p: TensorPlan, d: torch.Tensor, cap: int | None, svd: _SVDSettings) -> tuple:
    """(S, m, n) for the budget allocator. An expert stack shares one rank (PEFT's layout): its
    rank-k step costs E·(m + n) and gains Σ_e σ_{e,k}², so it enters as one module of that spectrum."""
    if p.action != "experts":
        res = truncated_svd(_orient(d, p.kind), cap, name=p.name, **svd.kw())
        return (res.S, *res.shape)
    spectra = [truncated_svd(d[e], cap, name=f"{p.name}[{e}]", **svd.kw()).S for e in range(d.shape[0])]
    k = min(len(s) for s in spectra)
    S = torch.stack([s[:k].double() ** 2 for s in spectra]).sum(0).sqrt()  # (k,)
    E, m, n = d.shape
    return (S, E * m, E * n)


def _budget_ranks(plan: ExtractPlan, budget: int, pair: _Pair, svd: _SVDSettings,
                  progress: Progress | None) -> dict[str, int]:
    """The budget policy's first pass: every LoRA candidate's spectrum (each expert's), the row
    norms of an embedding written as rows, then the allocator: {tensor: rank, or row count}."""
    cands = [p for p in plan.tensors if p.action in ("lora", "experts", "rows")]
    spectra: dict[str, Any] = {}
    for i, p in enumerate(cands):
        d = pair.delta(p)[0]
        spectra[p.name] = RowSpectrum.of(d) if p.action == "rows" else _spectra(p, d, plan.cap, svd)
        del d
        if progress:
            progress("spectra", i + 1, len(cands))
    return allocate_budget(spectra, budget)


def _row_count(sq: torch.Tensor, dim: int, opts: ExtractOptions) -> int:
    """How many rows embeddings="rows" keeps outside a budget: as many as a rank-N LoRA's
    parameters buy (N the fixed rank), or the fewest reaching `energy` of ‖Δ‖² (SQ: each row's
    squared norm)."""
    if opts.energy is None:
        return (opts.effective_rank or 1) * (sq.numel() + dim) // dim
    norms = torch.sort(sq, descending=True).values.sqrt()
    return rank_for_energy(norms, float(sq.sum()), float(opts.energy))


def decompose_rows(p: TensorPlan, sq: torch.Tensor, dim: int, total: float, wsq: float, count: int,
                   ft: Callable[[], torch.Tensor], out_dtype: torch.dtype) -> Row:
    """An embedding delta, given as each row's squared norm SQ (vocab,) -> its `count` most changed
    rows, whole (the fine-tune's values, which PEFT's trainable tokens put in place of the base's),
    and the report row. The error is the squared norm of the rows left out plus what the cast to
    out_dtype costs."""
    name = p.name
    if total == 0.0:
        return Row(name, skipped={"tensor": name, "why": "delta is zero"}, target=p.target)
    changed = int((sq > 0).sum())
    k = min(count, changed)
    if k == 0:
        return Row(name, skipped={"tensor": name, "why": "budget gave no rows", "delta_norm": math.sqrt(total)},
                   sq_err=total, sq_tot=total, target=p.target, delta_sq=total)
    order = torch.sort(sq, descending=True, stable=True).indices
    idx = order[:k].sort().values
    full = ft()[idx]
    values = full.to(out_dtype)
    err = float(sq[order[k:]].sum()) + float((values.double() - full.double()).pow(2).sum())
    wnorm = math.sqrt(wsq)
    note = f"{k} of {changed} changed rows, whole (trainable tokens)"
    report = ModuleReport(p.module, p.kind, (int(sq.numel()), int(dim)), 0, values.numel(), math.sqrt(total),
                          math.sqrt(total) / wnorm if wnorm else math.inf, math.sqrt(min(err, total) / total),
                          1.0 - min(err, total) / total, "rows", note, rows=k)
    return Row(name, report=report, sq_err=min(err, total), sq_tot=total, target=p.target, delta_sq=total,
               tokens=([int(i) for i in idx], values.contiguous()))


def _rows_row(p: TensorPlan, pair: _Pair, opts: ExtractOptions, count: int | None) -> Row:
    d, total, wsq = pair.delta(p)
    sq, dim = RowSpectrum.row_sq(d), int(d.shape[1])
    del d
    dtype = parse_dtype(opts.dtype) or pair.base_idx.tensors[p.name].dtype
    count = _row_count(sq, dim, opts) if count is None else count
    return decompose_rows(p, sq, dim, total, wsq, count, lambda: pair.ft(p), dtype)


def _lora_row(p: TensorPlan, plan: ExtractPlan, pair: _Pair, opts: ExtractOptions, svd: _SVDSettings,
              ranks: Mapping[str, int] | None) -> Row:
    d, total, wsq = pair.delta(p)
    dtype = parse_dtype(opts.dtype) or (pair.base_idx.tensors[p.sources[0] if p.sources else p.name].dtype)
    if p.action == "experts":
        br = None if ranks is None else [ranks[p.name]] * d.shape[0]
        k = plan.cap if ranks is None else max(ranks[p.name], 1)
        return decompose_experts(p, d, total, wsq, k, opts, dtype, svd, plan.experts[p.target], br)
    rank = None if ranks is None else ranks[p.name]
    k = plan.cap if rank is None else rank
    return decompose_lora(p, d, total, wsq, k, opts, dtype, svd, budget_rank=rank)


def decompose(plan: ExtractPlan, pair: _Pair, opts: ExtractOptions, svd: _SVDSettings,
              progress: Progress | None = None) -> list[Row]:
    """One row per planned tensor, in shard order; one delta in memory at a time."""
    out_dtype = parse_dtype(opts.dtype)
    ranks = None if plan.budget_params is None else _budget_ranks(plan, plan.budget_params, pair, svd, progress)
    rows = []
    for i, p in enumerate(plan.tensors):
        if p.action == "rows":
            rows.append(_rows_row(p, pair, opts, None if ranks is None else ranks[p.name]))
        elif p.action in ("lora", "experts"):
            rows.append(_lora_row(p, plan, pair, opts, svd, ranks))
        elif p.action == "full":
            rows.append(_whole_row(p, pair, out_dtype))
        else:
            rows.append(_other_row(p, pair, plan.bias_form))
        if progress:
            progress("extract", i + 1, len(plan.tensors))
    return rows


# ----------------------------------------------------------------------------- assemble


@dataclass
class _Adapter:
    modules: dict[str, LoraModule]
    whole: dict[str, torch.Tensor]  # model name -> tensor
    skipped: list[dict]
    notes: list[str]
    params: dict[str, ParamLora] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # bias="all" values, model names
    tokens: dict[str, tuple[list[int], torch.Tensor]] = field(default_factory=dict)  # module -> (ids, rows)


def _zero_lora(module: str, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> LoraModule:
    """A rank-1 LoRA of zeros on a Linear / Conv1D weight of storage `shape`: no effect, but a
    place for lora_B.bias (PEFT refuses rank 0) or the LoRA module PEFT needs at least one of."""
    out_f, in_f = (shape[1], shape[0]) if kind == "conv1d" else (shape[0], shape[1])
    return LoraModule(module, "linear", torch.zeros(1, in_f, dtype=dtype), torch.zeros(out_f, 1, dtype=dtype))


def _collect(rows: list[Row], plan: ExtractPlan, pair: _Pair, out_dtype: torch.dtype | None) -> _Adapter:
    """LoRA modules with their bias deltas (lora_B.bias), expert LoRAs, whole tensors, bias="all"
    values, skips and notes. A bias delta on a module without a LoRA gets a zero rank-1 LoRA."""
    modules = {r.lora.module: r.lora for r in rows if r.lora is not None}
    params = {r.param.param: r.param for r in rows if r.param is not None}
    skipped = [r.skipped for r in rows if r.skipped is not None]
    notes = [r.note for r in rows if r.note]
    by_target = {p.target: p for p in plan.tensors}
    biases: dict[str, torch.Tensor] = {}
    for r in rows:
        if r.bias is None:
            continue
        target = r.target or r.name
        if plan.bias_form == "all":
            biases[target] = r.bias
            continue
        module = target.rsplit(".", 1)[0]
        if module not in modules:
            weight = by_target.get(module + ".weight")
            if weight is None or weight.kind not in ("linear", "conv1d") or weight.action != "lora":
                skipped.append({"tensor": r.name, "why": "its weight has no LoRA (bias not representable)",
                                "delta_norm": float(r.bias.norm())})
                continue
            dtype = out_dtype or pair.base_idx.tensors[weight.name].dtype
            modules[module] = _zero_lora(module, weight.kind, pair.base_idx.tensors[weight.name].shape, dtype)
            notes.append(f"{module}: only its bias changed; a zero rank-1 LoRA carries it (lora_B.bias)")
        modules[module] = dataclasses.replace(modules[module], bias=r.bias.to(modules[module].B.dtype))
    whole = {r.target or r.name: r.whole for r in rows if r.whole is not None}
    tokens = {(r.target or r.name).rsplit(".", 1)[0]: r.tokens for r in rows if r.tokens is not None}
    return _Adapter(modules, whole, skipped, notes, params, biases, tokens)


def _common_rank(ad: _Adapter) -> int:
    """The adapter's `r` as write_adapter picks it: the most common rank (ties: the smaller)."""
    ranks = [m.rank for m in ad.modules.values()] + [p.rank for p in ad.params.values()]
    return min(set(ranks), key=lambda r: (-ranks.count(r), r))


def _pad_params(ad: _Adapter) -> list[str]:
    """Expert LoRAs below the adapter's common rank are zero-padded to it: PEFT warns about any
    rank_pattern key for a target parameter (it checks them against module names only)."""
    if not ad.params:
        return []
    r = _common_rank(ad)
    for name, p in list(ad.params.items()):
        if p.rank < r:
            E = p.experts
            A = p.A.reshape(E, p.rank, -1)  # (E, r_p, in)
            B = p.B.reshape(p.B.shape[0], p.rank, E)  # (out, r_p, E)
            A = torch.cat([A, A.new_zeros(E, r - p.rank, A.shape[2])], 1).reshape(E * r, -1)
            B = torch.cat([B, B.new_zeros(B.shape[0], r - p.rank, E)], 1).reshape(B.shape[0], r * E)
            ad.params[name] = dataclasses.replace(p, A=A.contiguous(), B=B.contiguous())
    high = sorted(n for n, p in ad.params.items() if p.rank > r)
    return [f"{n}: rank {ad.params[n].rank} > r={r}; PEFT 0.21 applies it but warns that its rank_pattern key "
            "matched no module" for n in high[:3]]


def _tied_heads(ad: _Adapter, tied: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tied output heads: an embedding saved whole takes its head along (modules_to_save with
    ensure_weight_tying), so PEFT's unmerged model changes the logits exactly as the fine-tune."""
    notes, heads = [], {}
    for head, src in tied.items():
        if src.rsplit(".", 1)[0] in ad.modules:
            notes.append(f"{head}.weight is tied to {src}: its LoRA reaches the output head once merged")
        if src in ad.whole and head + ".weight" not in ad.whole:
            heads[head + ".weight"] = ad.whole[src]
            notes.append(f"{head}.weight is tied to {src}: saved whole beside it (modules_to_save, "
                         "ensure_weight_tying)")
    return heads, notes


def _carrier(ad: _Adapter, plan: ExtractPlan, pair: _Pair) -> tuple[dict[str, LoraModule], list[str]]:
    """PEFT needs at least one LoRA module: when only whole tensors / biases changed, a zero
    rank-1 LoRA on the first free Linear (else Conv1D) carries the adapter (it has no effect)."""
    if ad.modules or ad.params:
        return ad.modules, []
    taken = {n.rsplit(".", 1)[0] for n in ad.whole}
    # a module whose checkpoint name is its own first (readers that do not map names can place it)
    for kind, renamed in (("linear", False), ("conv1d", False), ("linear", True), ("conv1d", True)):
        for p in plan.tensors:
            if p.kind == kind and bool(p.param) == renamed and p.target.endswith(".weight") \
                    and p.module not in taken and not p.grown and p.action in ("lora", "skip"):
                shape = pair.base_idx.tensors[p.name].shape
                z = _zero_lora(p.module, kind, shape, pair.base_idx.tensors[p.name].dtype)
                return {p.module: z}, [f"{p.module}: a zero rank-1 LoRA (no effect) carries the adapter; "
                                       "PEFT needs at least one LoRA module"]
    raise SurgeryError("the changes need a LoRA module for PEFT to load them, and the model has no free "
                       "Linear/Conv1D layer to carry one")


def _auto_mapping(config: Mapping[str, Any] | None) -> dict | None:
    """PEFT's auto_mapping (what AutoPeftModel loads when task_type is null): the architecture
    class and its module, for classes transformers ships."""
    archs = (config or {}).get("architectures") or []
    if not archs or not isinstance(archs[0], str) or (config or {}).get("auto_map"):
        return None
    import transformers

    cls = getattr(transformers, archs[0], None)
    if not isinstance(cls, type):
        return None
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


@dataclass(frozen=True)
class _Inputs:
    """The two inputs as given and as resolved (a Hub id resolves to its cached snapshot)."""

    base: Path
    ft: Path
    base_ref: str  # base_model_name_or_path: the Hub id, or the absolute path
    revision: str | None = None


def _share_notes(rows: list[Row], ad: _Adapter, whole: Mapping[str, torch.Tensor], model_params: int,
                 ) -> tuple[float, list[str]]:
    """The share of the delta left out (each skip gets its `share`) and the size warnings."""
    total = sum(r.delta_sq for r in rows)
    left = 0.0
    for s in ad.skipped:
        sq = s.get("delta_norm", 0.0) ** 2
        left += sq
        if total and sq:
            s["share"] = sq / total
    parts = {f"{n} (LoRA)": m.A.numel() + m.B.numel() for n, m in ad.modules.items()}
    parts.update({f"{n} (expert LoRA)": p.A.numel() + p.B.numel() for n, p in ad.params.items()})
    parts.update({f"{n} (whole)": t.numel() for n, t in whole.items()})
    parts.update({f"{n} (rows)": t.numel() for n, (_, t) in ad.tokens.items()})
    size = sum(parts.values()) + sum(t.numel() for t in ad.biases.values())
    warnings = []
    if model_params and size > SIZE_WARNING_SHARE * model_params:
        big = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
        largest = ", ".join(f"{n} {k / model_params:.1%}" for n, k in big)
        warnings.append(f"the adapter holds {size / model_params:.0%} of the model's parameters (over "
                        f"{SIZE_WARNING_SHARE:.0%}); largest: {largest}; lower the rank, use energy / budget, or "
                        "keep embeddings as LoRAs")
    return (left / total if total else 0.0), warnings


def _stored_dtype(idx: CheckpointIndex, names: list[str]) -> str:
    """The dtype most of NAMES are stored in ("float32", "bfloat16", ...)."""
    counts: dict[str, int] = {}
    for n in names:
        info = idx.tensors.get(n)
        if info is not None:
            key = str(info.dtype).removeprefix("torch.")
            counts[key] = counts.get(key, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else ""


def quality_warnings(rows: list[Row], plan: ExtractPlan, pair: _Pair, opts: ExtractOptions) -> list[str]:
    """Warnings when the adapter is poor by its own measure: energy targets cut short by the rank
    cap (field `max_rank`), a delta that is mostly the rounding of a coarser stored dtype."""
    reports = [r.report for r in rows if r.report is not None]
    out = []
    capped = capped_energy_warning([(m.module, m.rank, m.energy_kept) for m in reports], opts.energy, plan.cap)
    if capped:
        out.append(capped)
    names = [r.name for r in rows if r.report is not None]
    rounding = rounding_delta_warning([(m.module, m.rel_change) for m in reports],
                                      _stored_dtype(pair.base_idx, names), _stored_dtype(pair.ft_idx, names))
    if rounding:
        out.append(rounding)
    return out


def _tokenizer_files(inputs: _Inputs, plan: ExtractPlan) -> tuple[Path, list[str]] | None:
    """FT's tokenizer files when the vocabulary grew: AutoPeftModel resizes the base to them."""
    if not any(p.grown for p in plan.tensors) or not inputs.ft.is_dir():
        return None
    names = [n for n in _TOKENIZER_FILES if (inputs.ft / n).is_file()]
    return (inputs.ft, names) if names else None


def _config_extras(plan: ExtractPlan, ad: _Adapter, whole: Mapping[str, torch.Tensor], inputs: _Inputs) -> dict:
    extra: dict[str, Any] = {}
    tied_src = set(plan.tied.values())
    if tied_src & set(whole):
        extra["ensure_weight_tying"] = True  # PEFT ties the head's copy to the embedding's
    if plan.task_type is None:
        mapping = _auto_mapping(plan.config)
        if mapping:
            extra["auto_mapping"] = mapping
    if inputs.revision is not None and is_hub_id(inputs.base_ref):
        extra["revision"] = inputs.revision
    return extra


def assemble(plan: ExtractPlan, rows: list[Row], opts: ExtractOptions, inputs: _Inputs, out: Path,
             pair: _Pair, report_options: dict | None = None, t0: float | None = None) -> ExtractResult:
    """Write the adapter directory (atomically) and return the report (timed from t0)."""
    ad = _collect(rows, plan, pair, parse_dtype(opts.dtype))
    if not (ad.modules or ad.params or ad.whole or ad.biases or ad.tokens):
        changed = [s for s in ad.skipped if s.get("delta_norm") or "differs" in s["why"]]
        if changed:
            raise SurgeryError(f"every change between {inputs.base} and {inputs.ft} is left out ({len(changed)} "
                               f"tensors; {changed[0]['tensor']}: {changed[0]['why']}); nothing was written")
        raise SurgeryError(f"{inputs.base} and {inputs.ft} have no weight differences to extract; nothing was written")
    heads, tied_notes = _tied_heads(ad, plan.tied)
    whole = {**ad.whole, **heads}
    ad.modules, carrier_notes = _carrier(ad, plan, pair)
    notes = list(plan.notes) + ad.notes + tied_notes + carrier_notes + _pad_params(ad)
    if opts.serving_safe and whole:
        notes.append(f"serving_safe: {len(whole)} tensor(s) saved whole in modules_to_save anyway "
                     "(a grown vocabulary cannot be a LoRA)")
    if ad.biases:
        notes.append(f"{len(ad.biases)} bias delta(s) written with PEFT's bias='all': the fine-tune's values "
                     "replace the base's on load (lora_bias cannot sit beside an embedding / expert LoRA)")
    fan_in_fan_out = any(p.kind == "conv1d" and p.module in ad.modules for p in plan.tensors)
    if fan_in_fan_out and ad.params:
        raise SurgeryError("PEFT's expert LoRA (target_parameters) refuses fan_in_fan_out, which this model's "
                           "Conv1D layers need; exclude one of them with include/exclude")
    stored = [(f"{n} {slot}", t) for n, m in ad.modules.items()  # as written: after the cast to the adapter dtype
              for slot, t in (("lora_A", m.A), ("lora_B", m.B), ("lora_B.bias", m.bias)) if t is not None]
    stored += [(f"{n} rows", t) for n, (_, t) in ad.tokens.items()]
    require_finite(stored + list(whole.items()) + list((ad.biases or {}).items()), "the adapter",
                   "the delta is too large to store in that dtype; exclude this module, or use dtype fp32 "
                   "for an fp16/bf16 adapter")
    extra = _config_extras(plan, ad, whole, inputs)
    write_adapter(out, ad.modules, full_tensors=whole, base_model_name_or_path=inputs.base_ref,
                  task_type=plan.task_type, fan_in_fan_out=fan_in_fan_out, overwrite=opts.overwrite,
                  inputs=[inputs.base, inputs.ft], extra_config=extra or None, target_parameters=ad.params or None,
                  bias_tensors=ad.biases or None, copy_files=_tokenizer_files(inputs, plan),
                  trainable_tokens=ad.tokens or None)
    left_share, warnings = _share_notes(rows, ad, whole, plan.model_params)
    warnings += quality_warnings(rows, plan, pair, opts)
    sq_err, sq_tot = sum(r.sq_err for r in rows), sum(r.sq_tot for r in rows)
    reports = [r.report for r in rows if r.report is not None]
    lora_bias = sum(m.bias.numel() for m in ad.modules.values() if m.bias is not None)
    result = ExtractResult(
        out=out, modules=reports, full=list(whole), skipped=ad.skipped, notes=notes,
        adapter_params=sum(m.params for m in reports) + lora_bias,
        full_params=sum(t.numel() for t in ad.whole.values()), model_params=plan.model_params,
        overall_rel_error=math.sqrt(sq_err / sq_tot) if sq_tot else 0.0,
        options=dict(report_options or {}), seconds=time.perf_counter() - t0 if t0 is not None else 0.0,
        bias_params=sum(t.numel() for t in ad.biases.values()), left_out_share=left_share,
        task_type=plan.task_type, warnings=warnings,
    )
    _card(result, inputs, report_options)
    return result


def _card(res: ExtractResult, inputs: _Inputs, options: dict | None) -> None:
    """The adapter's model card (README.md), written into the finished adapter directory."""
    opts = {k: v for k, v in (options or {}).items() if k != "device"}
    worst = max(res.modules, key=lambda m: m.rel_error, default=None)
    share = 100 * (res.adapter_params + res.full_params) / max(res.model_params, 1)
    rows = [m for m in res.modules if m.method == "rows"]
    summary: dict[str, Any] = {"LoRA modules": len(res.modules) - len(rows)}
    if rows:
        summary["embedding rows (trainable_token_indices)"] = ", ".join(f"{m.module}: {m.rows}" for m in rows)
    summary[f"{'adapter parameters (LoRA + rows)' if rows else 'LoRA parameters'}"] = res.adapter_params
    summary.update({"tensors saved whole": len(res.full),
                    "share of the model's parameters": f"{share:.2f}%",
                    "overall relative error |delta - BA| / |delta|": round(res.overall_rel_error, 6),
                    "share of the delta left out": f"{100 * res.left_out_share:.2f}%"})
    if worst is not None:
        summary["worst module"] = f"{worst.module}: relative error {worst.rel_error:.4f}, energy kept " \
                                  f"{100 * worst.energy_kept:.2f}%"
    summary.update({f"warning {i + 1}": w.replace("`", "") for i, w in enumerate(res.warnings)})
    write_card(res.out, "extract-lora", inputs.base_ref, opts, summary, inputs=[inputs.base, inputs.ft],
               tags=["lora"])


# ----------------------------------------------------------------------------- entry point


def _open_models(base: Path, ft: Path) -> tuple[CheckpointIndex, CheckpointIndex]:
    base_idx, ft_idx = open_checkpoint(base), open_checkpoint(ft)
    for idx, what in ((base_idx, "BASE"), (ft_idx, "FT")):
        if idx.kind != "model":
            raise CheckpointError(f"{idx.source}: {what} is an adapter directory; give a model checkpoint")
    return base_idx, ft_idx


def _inputs(base: str | Path, ft: str | Path, revision: str | None) -> _Inputs:
    """Resolve Hub ids from the cache; base_model_name_or_path is the Hub id, or BASE's absolute
    path (AutoPeftModel then finds it from any working directory)."""
    b, f = resolve_model(base, revision), resolve_model(ft, revision)
    ref = str(base) if is_hub_id(base) else str(Path(base).resolve())
    return _Inputs(b, f, ref, revision)


def _numel(p: TensorPlan, idx: CheckpointIndex) -> int:
    """Elements of a planned tensor (a fused parameter: of all its checkpoint tensors)."""
    return sum(idx.tensors[s].numel for s in p.sources) if p.sources else idx.tensors[p.name].numel


def _options_report(opts: ExtractOptions, device: torch.device) -> dict:
    """The options as the report records them (the values in force)."""
    return {
        "rank": opts.effective_rank, "energy": opts.energy, "budget": opts.budget, "svd": opts.svd,
        "niter": opts.niter, "max_rank": opts.max_rank, "include": list(opts.include),
        "exclude": list(opts.exclude), "embeddings": opts.embeddings, "other_deltas": opts.effective_other_deltas,
        "bias": opts.bias, "dtype": opts.dtype, "device": str(device), "seed": opts.seed,
        "task_type": opts.task_type, "revision": opts.revision,
    }


def extract_lora(
    base: str | Path,
    ft: str | Path,
    out: str | Path,
    options: ExtractOptions | None = None,
    *,
    progress: Progress | None = None,
    **fields: Any,
) -> ExtractResult:
    """Extract FT − BASE into a PEFT LoRA adapter directory at OUT.

    Streams one tensor pair at a time (base shard order) and decomposes each delta with a
    truncated SVD in fp32; see the module docstring for the phases. The adapter is keyed by the
    model's own (in-memory) names, loads with `PeftModel.from_pretrained(base, OUT)` and with
    `AutoPeftModel*.from_pretrained(OUT)` (task_type and an absolute base path are recorded).

    Args:
        base, ft: model checkpoints (directories or files) of the same architecture, or Hub ids
            (``org/name``) already in the Hugging Face cache (`revision` option).
        out: the adapter directory to write (atomically).
        options: an ExtractOptions; `fields` (its field names) build it or replace fields of it.
        progress: optional callback(stage, done, total).
    Returns:
        ExtractResult: one report row per LoRA module, tensors saved whole, skipped deltas
        with their reasons and shares, notes, warnings, parameter counts and the overall error.
    Raises:
        OptionError: a bad option (field named), an include pattern that matches nothing,
            nothing selected, an unavailable device.
        CheckpointError: unreadable inputs, a Hub id not in the cache, different tensors or
            shapes, NaN/Inf.
        OutputError: OUT exists (without overwrite) or overlaps an input.
        SurgeryError: the two models do not differ, or every difference is left out.

    Example:
        >>> res = extract_lora("fixtures/tiny-bert", "fixtures/tiny-bert-ft", "out/lora", rank=4)
        >>> res.overall_rel_error < 1, res.task_type
        (True, 'FEATURE_EXTRACTION')
    """
    opts = ExtractOptions.build(options, **fields)
    t0 = time.perf_counter()
    inputs, out = _inputs(base, ft, opts.revision), Path(out)
    check_output_path(out, opts.overwrite, [inputs.base, inputs.ft])
    svd = _SVDSettings(opts.svd, opts.niter, opts.seed, resolve_device(opts.device))
    base_idx, ft_idx = _open_models(inputs.base, inputs.ft)
    with torch_threads(opts.threads), LazyReader(base_idx) as rb, LazyReader(ft_idx) as rf:
        pair = _Pair(base_idx, ft_idx, rb, rf)
        plan = plan_extraction(pair, opts)
        big = max(plan.tensors, key=lambda p: _numel(p, base_idx))  # each delta is held in fp32
        check_fits(4 * _numel(big, base_idx), f"the fp32 delta of {escape_name(big.name, 200)}")
        rows = decompose(plan, pair, opts, svd, progress)
        return assemble(plan, rows, opts, inputs, out, pair, _options_report(opts, svd.device), t0)


__all__ = ["extract_lora", "ExtractOptions", "ExtractResult", "ModuleReport", "plan_extraction", "decompose",
           "decompose_lora", "decompose_experts", "pack_experts", "assemble", "ExtractPlan", "TensorPlan", "Row",
           "infer_task_type", "TASK_MODULES_TO_SAVE"]
