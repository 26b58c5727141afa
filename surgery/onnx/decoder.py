"""Causal LMs exported to ONNX WITH a KV cache: one graph for prefill and decode.

    result = export_decoder_with_past(model, "out/")            # validated by greedy generation
    ORTModelForCausalLM.from_pretrained("out/", use_cache=True)  # Optimum reads it as its own export
    onnxruntime_genai.Model("out/")                              # so does onnxruntime-genai

The graph follows Optimum's `text-generation-with-past` layout exactly:

  inputs   input_ids          (batch_size, sequence_length)                      int64
           attention_mask     (batch_size, past_sequence_length + sequence_length) int64
           position_ids       (batch_size, sequence_length)     (models that take them)
           past_key_values.{i}.key / .value   (batch_size, kv_heads, past_sequence_length, head_dim)
  outputs  logits             (batch_size, sequence_length, vocab)
           present.{i}.key / .value  (batch_size, kv_heads, past_sequence_length + sequence_length, head_dim)

Prefill feeds an empty cache (past_sequence_length 0); each decode step feeds the previous
`present.*` back. transformers 5 keeps the cache in a Cache object, which no exporter takes as an
input, so DecoderWithPast takes flat tensors, builds a DynamicCache, and returns flat tensors.
Sliding-window layers (Gemma-2/3, Mistral) keep their whole past in the graph's cache: the
window is applied by the attention mask, which gives the same attention as transformers' cropped
cache and the uniform cache shape Optimum and onnxruntime-genai expect.
Mixture-of-experts blocks (Mixtral, OLMoE, Qwen2/3-MoE) trace in surgery.onnx.moe's dense form
while exporting only (the manifest's exporter_note says so); validation runs the sparse model.

Pipeline (into a temporary sibling of OUT_DIR, renamed into place at the end):

  model ──probe (one forward with use_cache)──► layout (layers, kv heads, head_dim), or refusal of
        a cache that is not key/value tensors (Mamba, RWKV and other recurrent state)
  ──exporter "auto": the legacy TorchScript exporter (about 3x faster), its graph checked against
        PyTorch at other sizes (check_graph), else torch.onnx.export(dynamo=True); or the one asked──►
        axes renamed to Optimum's names, each checked symbolic; IR version clamped to what onnxruntime reads
  ──► model.onnx (one file; weights in model.onnx_data only past 2 GB, Optimum's name)
      config.json, generation_config.json, tokenizer files, genai_config.json
  ──validate_generation (greedy, left-padded batch, prompt longer than the export)──► manifest.json

fp16: the model is cast to fp16 in PyTorch and exported (as Optimum does on GPU): weights, cache
and logits are fp16, and the norms and softmax keep the upcasts the model's code makes. The file
keeps Optimum's name model.onnx; the graph's past/present types, manifest.json ("dtype") and
genai_config.json say fp16, and ORTModelForCausalLM / onnxruntime-genai read the cache dtype
from the graph's input types.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.errors import CheckpointError, OptionError, SurgeryError, ValidationError
from surgery.io import atomic_output_dir, check_output_path, escape_name
from surgery.onnx.decoder_check import (
    MANIFEST_FILE,
    MODEL_FILE,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
    GenerationReport,
    validate_generation,
)
from surgery.onnx.moe import dense_experts

Progress = Callable[[str, int, int], None]

DATA_FILE = "model.onnx_data"  # Optimum's name for external weights (only past 2 GB)
GENAI_FILE = "genai_config.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TWO_GB = 2**31 - 1

#: Optimum's axis names
BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"
#: torch.export.Dim names (identifiers) of axis labels that are not identifiers
_DIM_NAMES = {TOTAL: "total_sequence_length"}

# Dummy sizes for export: all ≥ 2 and pairwise different, so torch.export specialises none of
# them (it does 0 and 1) and unifies none (equal sizes can share one symbol). The total length
# (past + sequence = 12) is what validation's longest prompt must exceed.
EXPORT_BATCH, EXPORT_SEQ, EXPORT_PAST = 3, 5, 7

#: cache layers that hold exactly (keys, values) per layer; anything else is refused
KV_LAYER_CLASSES = ("DynamicLayer", "DynamicSlidingWindowLayer")

#: model_type -> onnxruntime-genai "type" (0.18 registers these names; others run as its generic
#: "decoder"; its "gpt2" type expects another cache layout, so GPT-2 runs as "decoder" too)
GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
               "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3_text",
               "granite": "granite", "olmo": "olmo", "nemotron": "nemotron", "smollm3": "smollm3"}

#: files copied from a model directory beside model.onnx (those that exist)
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
              "added_tokens.json", "spiece.model", "chat_template.jinja", "chat_template.json")


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class DecoderLayout:
    """What the graph's inputs and outputs look like, read from the model and one probe forward."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_attention_heads: int
    hidden_size: int
    vocab_size: int
    position_ids: bool  # the model's forward takes position_ids
    cache_arg: str  # "cache" (transformers 5) or "past_key_values" (4.x)
    context_length: int | None

    @property
    def past_names(self) -> list[str]:
        return [t % i for i in range(self.num_layers) for t in (PAST_KEY, PAST_VALUE)]

    @property
    def present_names(self) -> list[str]:
        return [t % i for i in range(self.num_layers) for t in (PRESENT_KEY, PRESENT_VALUE)]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + (["position_ids"] if self.position_ids else []) + self.past_names

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + self.present_names

    def axes(self) -> dict[str, dict[int, str]]:
        """{graph input/output name: {axis: Optimum's symbolic name}}."""
        out: dict[str, dict[int, str]] = {"input_ids": {0: BATCH, 1: SEQ}, "attention_mask": {0: BATCH, 1: TOTAL}}
        if self.position_ids:
            out["position_ids"] = {0: BATCH, 1: SEQ}
        out.update({n: {0: BATCH, 2: PAST} for n in self.past_names})
        out["logits"] = {0: BATCH, 1: SEQ}
        out.update({n: {0: BATCH, 2: TOTAL} for n in self.present_names})
        return out


def _config_int(cfg: Any, *names: str) -> int | None:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _cache_pairs(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers cache; SurgeryError for any other kind of state."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise SurgeryError(f"the model returned a {type(cache).__name__} cache, not per-layer keys and values; "
                           "only attention caches export with past (export logits only instead)")
    bad = sorted({type(lay).__name__ for lay in layers if type(lay).__name__ not in KV_LAYER_CLASSES})
    if bad:
        raise SurgeryError(f"the model's cache holds {', '.join(bad)} state (recurrent or non key/value), which the "
                           "text-generation-with-past layout cannot carry; export it without a cache (logits only)")
    return [(lay.keys, lay.values) for lay in layers]


def probe_layout(model: Any) -> DecoderLayout:
    """Read the cache layout from one short forward with use_cache=True.

    Raises SurgeryError for a model whose cache is not key/value tensors per layer (Mamba, RWKV,
    hybrid recurrent models) or whose layers cache different shapes."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    vocab = _config_int(cfg, "vocab_size")
    if vocab is None or cache_arg not in params:
        raise SurgeryError(f"{type(model).__name__} is not a causal LM with a cache (no vocab_size or no "
                           f"{cache_arg} argument); export it without a cache")
    ids = torch.randint(0, vocab, (1, 3), generator=torch.Generator().manual_seed(0))
    from surgery.core.hf import quiet

    with quiet(), torch.no_grad():
        out = model(input_ids=ids.to(next(model.parameters()).device), use_cache=True)
    cache = out["cache"] if "cache" in out else out.get("past_key_values")
    if cache is None:
        raise SurgeryError(f"{type(model).__name__} returned no cache with use_cache=True; export it without a cache")
    pairs = _cache_pairs(cache)
    shapes = {(tuple(k.shape[1::2]), tuple(v.shape[1::2])) for k, v in pairs}
    if len(shapes) != 1 or any(k.dim() != 4 or v.dim() != 4 for k, v in pairs):
        raise SurgeryError(f"the model's layers cache tensors of different shapes ({sorted(shapes)}); the "
                           "text-generation-with-past layout needs one (kv_heads, head_dim) for every layer")
    (kv_heads, head_dim), _ = shapes.pop()
    heads = _config_int(cfg, "num_attention_heads", "n_head", "num_heads") or kv_heads
    return DecoderLayout(
        model_type=str(getattr(cfg, "model_type", "") or getattr(model.config, "model_type", "")),
        num_layers=len(pairs), num_kv_heads=int(kv_heads), head_dim=int(head_dim), num_attention_heads=heads,
        hidden_size=_config_int(cfg, "hidden_size", "n_embd", "d_model") or heads * int(head_dim),
        vocab_size=vocab, position_ids="position_ids" in params, cache_arg=cache_arg,
        context_length=_config_int(cfg, "max_position_embeddings", "n_positions", "seq_length"),
    )


# ----------------------------------------------------------------------------- the exported module


class DecoderWithPast(torch.nn.Module):
    """Flat tensors in (input order of DecoderLayout.input_names), flat tensors out (logits, presents).

    Builds a DynamicCache from the past tensors, so exporters never see a Cache object."""

    def __init__(self, model: torch.nn.Module, layout: DecoderLayout):
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        lay = self.layout
        n_fixed = 3 if lay.position_ids else 2
        kwargs: dict[str, Any] = {"input_ids": args[0], "attention_mask": args[1]}
        if lay.position_ids:
            kwargs["position_ids"] = args[2]
        past = args[n_fixed:]
        cache = DynamicCache()
        for i in range(lay.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(**kwargs, **{lay.cache_arg: cache}, use_cache=True, return_dict=True)
        present = out["cache"] if "cache" in out else out["past_key_values"]
        flat = [t for pair in _cache_pairs(present) for t in pair]
        return (out["logits"], *flat)


def dummy_inputs(layout: DecoderLayout, dtype: torch.dtype, device: torch.device | str = "cpu",
                 batch: int = EXPORT_BATCH, seq: int = EXPORT_SEQ, past: int = EXPORT_PAST) -> tuple[torch.Tensor, ...]:
    """Export inputs in DecoderLayout.input_names order; row 0 is left-padded by two tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, layout.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[0, :2] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, past:]
    kv = [torch.randn(batch, layout.num_kv_heads, past, layout.head_dim, generator=g).to(dtype)
          for _ in layout.past_names]
    fixed = [ids, mask] + ([pos] if layout.position_ids else [])
    return tuple(t.to(device) for t in fixed + kv)


# ----------------------------------------------------------------------------- export and graph fixes


def _first_line(e: BaseException) -> str:
    from surgery.onnx.files import first_line as first

    return first(e)


def _export_dynamo(wrapper: Any, args: tuple[torch.Tensor, ...], raw: Path, opset: int) -> None:
    """wrapper: a module whose `.layout` has input_names, output_names and axes() (DecoderLayout or alike)."""
    from surgery.core.hf import quiet

    lay = wrapper.layout
    axes = lay.axes()
    named: dict[str, Any] = {}
    for label in sorted({label for n in lay.input_names for label in axes.get(n, {}).values()}):
        named[label] = torch.export.Dim(_DIM_NAMES.get(label, label))
    shapes = tuple({a: named[label] for a, label in axes.get(n, {}).items()} for n in lay.input_names)
    with quiet(capture_stdio=True), torch.no_grad():
        prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=opset, dynamic_shapes=(shapes,),
                                 input_names=lay.input_names, output_names=lay.output_names,
                                 external_data=True, verbose=False, report=False)
        if prog is None:
            raise RuntimeError("torch.onnx.export returned no program")
        prog.save(str(raw), external_data=True)


#: the legacy exporter's constant folding: off. onnxruntime folds the same constants when it loads the
#: graph (ORT_ENABLE_ALL, the default: 438 nodes either way on the bench Llama, same weights), and
#: folding at export raised the export's peak RSS by about 30 MiB there.
LEGACY_CONSTANT_FOLDING = False


def _export_legacy(wrapper: Any, args: tuple[torch.Tensor, ...], raw: Path, opset: int) -> None:
    from surgery.core.hf import quiet

    lay = wrapper.layout
    with quiet(capture_stdio=True), torch.no_grad():
        torch.onnx.export(wrapper, args, str(raw), dynamo=False, opset_version=opset,
                          input_names=lay.input_names, output_names=lay.output_names,
                          dynamic_axes=lay.axes(), do_constant_folding=LEGACY_CONSTANT_FOLDING)


def name_axes(proto: Any, layout: Any) -> bool:
    """Give every dynamic axis of the graph's inputs/outputs Optimum's name, in place; returns whether
    any name changed (the legacy exporter already writes Optimum's names).

    `layout` is a DecoderLayout or any object with input_names, output_names and axes().

    Raises ValidationError when an input or output is missing or extra, when an axis that must be
    dynamic was fixed by the exporter, or when one exporter symbol stands for two different axes
    (e.g. past and sequence length unified: the graph would only run with them equal)."""
    graph = proto.graph
    want = layout.axes()
    inits = {t.name for t in graph.initializer}
    got_names = [v.name for v in graph.input if v.name not in inits] + [v.name for v in graph.output]
    if sorted(got_names) != sorted(want):
        missing = sorted(set(want) - set(got_names))
        extra = sorted(set(got_names) - set(want))
        raise ValidationError(f"the exported graph's inputs/outputs differ from the layout (missing {missing}, "
                              f"extra {extra})")
    rename: dict[str, str] = {}
    for v in [*graph.input, *graph.output]:
        dims = v.type.tensor_type.shape.dim
        for axis, label in want.get(v.name, {}).items():
            d = dims[axis] if axis < len(dims) else None
            if d is None or not d.dim_param:
                fixed = d.dim_value if d is not None else "missing"
                raise ValidationError(f"'{v.name}' axis {axis} ({label}) is fixed to {fixed}, not symbolic; the "
                                      "export specialised it")
            if rename.setdefault(d.dim_param, label) != label:
                raise ValidationError(f"the exporter tied '{label}' to '{rename[d.dim_param]}' (one symbol "
                                      f"{d.dim_param!r}); the graph would only run with them equal")
    rename = {old: new for old, new in rename.items() if old != new}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]
    return bool(rename)


def save_decoder(proto: Any, path: Path) -> Path | None:
    """Save with the IR version clamped: one file under 2 GB, else weights in PATH_data (Optimum's
    name: model.onnx -> model.onnx_data). Returns the data file's path, or None."""
    import onnx

    from surgery.onnx.files import clamp_ir_version

    clamp_ir_version(proto)
    size = sum(len(t.raw_data) for t in proto.graph.initializer) + 64 * 2**20  # graph + small tensors margin
    data = path.with_name(path.name + "_data")
    if data.exists():
        data.unlink()
    if size < TWO_GB:
        onnx.save_model(proto, str(path))
        return None
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024, convert_attribute=False)
    data.chmod(0o644)
    return data


#: exporters tried for the with-past graph, in order, per `exporter` option. auto: legacy first (about
#: 3x faster than dynamo on decoders; its graph is checked against PyTorch at other shapes), dynamo next
#: ("dynamo-first": the unchecked dynamo-then-legacy order, for callers without a check)
EXPORTER_ORDER = {"auto": ("legacy", "dynamo"), "dynamo": ("dynamo",), "legacy": ("legacy",),
                  "dynamo-first": ("dynamo", "legacy")}
#: (batch, sequence, past) of the graph check: a prefill with an empty cache, a one-token decode step
CHECK_SHAPES = ((2, 4, 0), (1, 1, 9))
_WHAT = {"dynamo": "torch.onnx.export(dynamo=True)", "legacy": "the legacy TorchScript exporter"}


def _check_inputs(layout: DecoderLayout, dtype: torch.dtype, device: torch.device, batch: int, seq: int,
                  past: int) -> tuple[torch.Tensor, ...]:
    """dummy_inputs without padding (padded rows' outputs are arbitrary) at other sizes than the export's."""
    args = list(dummy_inputs(layout, dtype, device, batch=batch, seq=seq, past=past))
    args[1] = torch.ones_like(args[1])
    if layout.position_ids:
        args[2] = torch.arange(past, past + seq, device=device).expand(batch, seq).contiguous()
    return tuple(args)


def check_graph(path: Path, wrapper: Any,
                input_sets: Sequence[tuple[str, tuple[torch.Tensor, ...]]] | None = None) -> None:
    """Run the saved graph on onnxruntime (CPU) at CHECK_SHAPES and compare every output with PyTorch.

    Catches a graph that loads and has symbolic axes but computes with a size the exporter baked in
    (a TorchScript trace records Python ints). Tolerance: GENERATION_TOLERANCES of the weight dtype,
    atol relative to each output's max |value|.

    Args:
        path: the saved graph (model.onnx). wrapper: the DecoderWithPast it was exported from (or any
            module with a .layout taking flat tensors, when input_sets is given).
        input_sets: [(label, inputs in layout.input_names order)]; default: CHECK_SHAPES of the decoder.

    Raises:
        ValidationError: an output differs (names it, with the shape set), or onnxruntime cannot run it.

    Example:
        check_graph(Path("out/model.onnx"), DecoderWithPast(model, probe_layout(model)))
    """
    import numpy as np

    from surgery.onnx.decoder_check import GENERATION_TOLERANCES
    from surgery.onnx.files import ort

    param = next(wrapper.parameters())
    tol = GENERATION_TOLERANCES["fp16" if param.dtype == torch.float16 else "fp32"]
    rt = ort()
    so = rt.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_BASIC  # checks the export, loads faster
    try:
        sess = rt.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise ValidationError(f"onnxruntime cannot load the exported graph ({_first_line(e)})") from None
    names = wrapper.layout.input_names
    if input_sets is None:
        input_sets = [(f"batch {b}, sequence {s}, past {p}", _check_inputs(wrapper.layout, param.dtype, param.device,
                                                                           b, s, p)) for b, s, p in CHECK_SHAPES]
    for label, args in input_sets:
        with torch.no_grad():
            out = wrapper(*args)
        ref = [t.float().cpu().numpy() for t in ((out,) if isinstance(out, torch.Tensor) else out)]
        got = sess.run(None, {n: t.cpu().numpy() for n, t in zip(names, args, strict=True)})
        for name, r, g in zip(wrapper.layout.output_names, ref, got, strict=True):
            g = np.asarray(g, dtype=np.float32)
            bound = tol["atol"] * float(np.abs(r).max(initial=0.0)) + tol["rtol"] * np.abs(r)
            if g.shape != r.shape or not np.all(np.abs(g - r) <= bound):
                raise ValidationError(f"the graph's {name!r} differs from PyTorch at {label} (shape {g.shape} "
                                      f"vs {r.shape})")


def _export_one(name: str, wrapper: Any, args: tuple[torch.Tensor, ...], path: Path, opset: int,
                scratch: Path, check: bool) -> Path | None:
    """One exporter into scratch, axes named, saved to path (+ data path, returned), optionally checked."""
    import onnx

    from surgery.onnx.files import max_ir_version_supported

    raw = scratch / f"{name}.onnx"
    {"dynamo": _export_dynamo, "legacy": _export_legacy}[name](wrapper, args, raw, opset)
    proto = onnx.load(str(raw), load_external_data=True)
    extra = [p for p in scratch.iterdir() if p != raw and p.name.startswith(raw.name)]  # external data files
    inline = not extra
    renamed = name_axes(proto, wrapper.layout)
    if inline and not renamed and proto.ir_version <= max_ir_version_supported() and raw.stat().st_size < TWO_GB:
        del proto
        raw.replace(path)  # already what save_decoder would write (the legacy export): no re-serialising
        data = None
    else:
        for p in [raw, *extra]:  # the proto holds the weights now: no second copy on disk
            p.unlink()
        data = save_decoder(proto, path)
        del proto  # before the check's session loads the weights again
    if check:  # a wrapper may bring its own check inputs (seq2seq graphs); decoders use CHECK_SHAPES
        check_graph(path, wrapper, wrapper.check_inputs() if hasattr(wrapper, "check_inputs") else None)
    return data


def _note(name: str, exporter: str, failed: Sequence[str]) -> str:
    if exporter == "dynamo-first":
        return (f"{'; '.join(failed)}; used {_WHAT[name]}" if failed
                else f"{_WHAT[name]}, symbolic batch/sequence/past axes")
    if exporter != "auto":
        return f"exporter {exporter!r} asked: {_WHAT[name]}, symbolic batch/sequence/past axes"
    if failed:
        return f"auto: {'; '.join(failed)}; used {_WHAT[name]}"
    return (f"auto: {_WHAT[name]} (faster than dynamo on decoders; its graph matched PyTorch at batch/sequence/"
            "past sizes other than the export's), symbolic batch/sequence/past axes")


def _export_graph(wrapper: Any, args: tuple[torch.Tensor, ...], path: Path, opset: int,
                  scratch: Path, exporter: str = "dynamo-first") -> tuple[str, str, Path | None]:
    """The exporters of EXPORTER_ORDER[exporter] in turn until one gives a graph with symbolic axes
    (in auto, the first one's graph must also pass check_graph: a DecoderWithPast, or a wrapper with
    check_inputs()).
    (exporter, note, data path). `wrapper` is any module with a `.layout` (input_names,
    output_names, axes()) taking flat tensors."""
    scratch.mkdir(parents=True, exist_ok=True)
    order = EXPORTER_ORDER[exporter]
    failed: list[str] = []
    for i, name in enumerate(order):
        try:
            data = _export_one(name, wrapper, args, path, opset, scratch, check=i < len(order) - 1)
        except Exception as e:  # noqa: BLE001 - any failure of one exporter sends us to the next, with its reason
            for p in (path, path.with_name(path.name + "_data")):
                p.unlink(missing_ok=True)
            failed.append(f"{name} export failed ({_first_line(e)})")
            continue
        return name, _note(name, exporter, failed), data
    fix = "try another opset or report the model type" if len(order) > 1 else "try exporter 'auto'"
    raise SurgeryError(f"ONNX export with past failed: {'; '.join(failed)}; {fix}")


# ----------------------------------------------------------------------------- side files


def _side_files(model: Any, source: Path | None, tokenizer: Any, tmp: Path) -> list[str]:
    """config.json, generation_config.json and tokenizer files beside the graph; returns their names."""
    if source is not None:
        for name in SIDE_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
    if not (tmp / "config.json").is_file():
        cfg = copy.deepcopy(model.config)
        cfg.architectures = getattr(cfg, "architectures", None) or [type(model).__name__]
        cfg.to_json_file(str(tmp / "config.json"), use_diff=True)
    gc = getattr(model, "generation_config", None)
    if gc is not None and not (tmp / "generation_config.json").is_file():
        gc.to_json_file(str(tmp / "generation_config.json"), use_diff=True)
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            for name in SIDE_FILES[2:]:
                if (Path(tokenizer) / name).is_file():
                    shutil.copy2(Path(tokenizer) / name, tmp / name)
        else:
            tokenizer.save_pretrained(str(tmp))
    return sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name in SIDE_FILES)


def _token_ids(model: torch.nn.Module) -> dict[str, Any]:
    gc = getattr(model, "generation_config", None)
    out: dict[str, Any] = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(gc, key, None)
        out[key] = v if v is not None else getattr(model.config, key, None)
    eos = out["eos_token_id"]
    if out["pad_token_id"] is None:
        out["pad_token_id"] = eos[0] if isinstance(eos, list) and eos else eos
    return out


def genai_config(layout: DecoderLayout, model: torch.nn.Module) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this graph (names as templates, search defaults).

    genai rejects keys it does not know, so the dtype is not written here: genai reads the cache
    and logits types from the graph (manifest.json says it). past_present_share_buffer is false:
    the graph concatenates the cache (Optimum's layout), it does not write into a preallocated
    max-length buffer."""
    ids = _token_ids(model)
    gc = getattr(model, "generation_config", None)
    ctx = layout.context_length or 2048
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    if layout.position_ids:
        inputs["position_ids"] = "position_ids"
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
               "filename": MODEL_FILE, "head_size": layout.head_dim, "hidden_size": layout.hidden_size,
               "inputs": inputs, "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY,
                                             "present_value_names": PRESENT_VALUE},
               "num_attention_heads": layout.num_attention_heads, "num_hidden_layers": layout.num_layers,
               "num_key_value_heads": layout.num_kv_heads}
    search = {"diversity_penalty": 0.0, "do_sample": bool(getattr(gc, "do_sample", False) or False),
              "early_stopping": True, "length_penalty": 1.0, "max_length": ctx, "min_length": 0,
              "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
              "past_present_share_buffer": False,
              "repetition_penalty": float(getattr(gc, "repetition_penalty", None) or 1.0),
              "temperature": float(getattr(gc, "temperature", None) or 1.0),
              "top_k": int(getattr(gc, "top_k", None) or 1), "top_p": float(getattr(gc, "top_p", None) or 1.0)}
    model_cfg = {"bos_token_id": ids["bos_token_id"], "context_length": ctx, "decoder": decoder,
                 "eos_token_id": ids["eos_token_id"], "pad_token_id": ids["pad_token_id"],
                 "type": GENAI_TYPES.get(layout.model_type, "decoder"), "vocab_size": layout.vocab_size}
    return {"model": model_cfg, "search": search}


# ----------------------------------------------------------------------------- the entry point


@dataclass
class DecoderExport:
    """What export_decoder_with_past wrote, and how it checked."""

    out_dir: Path
    model_path: Path
    data_path: Path | None  # model.onnx_data, only past 2 GB
    dtype: str
    layout: DecoderLayout
    exporter: str  # "dynamo" | "legacy"
    exporter_note: str
    status: str  # "ok" | "failed" | "not validated"
    validation: GenerationReport | None
    manifest: dict[str, Any]
    export_seconds: float


@contextlib.contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Eager attention while exporting (plain MatMul/Softmax, which both exporters handle); the
    model's own setting is restored afterwards."""
    old = getattr(model.config, "_attn_implementation", None)
    if old in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    try:
        model.set_attn_implementation("eager")
    except (ValueError, ImportError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def model_or_dir(model: Any, what: str) -> torch.nn.Module | Path:
    """`model` itself when it is a module with a .config, else the Path of an existing directory.

    Raises OptionError (field "model") for a module without a config or another type, CheckpointError
    for a missing directory. `what` names the expected model in the message ("causal LM")."""
    if isinstance(model, torch.nn.Module):
        if getattr(model, "config", None) is None:
            raise OptionError(f"model must be a transformers {what} (it has no .config)", field="model")
        return model
    if not isinstance(model, (str, Path)):
        raise OptionError(f"model must be a model directory or a transformers model, got {type(model).__name__}",
                          field="model")
    path = Path(model)
    if not path.is_dir():
        raise CheckpointError(f"model directory {escape_name(path)} does not exist; pass a Hugging Face model "
                              "directory")
    return path


def _load(model: Any) -> tuple[torch.nn.Module, Path | None]:
    found = model_or_dir(model, "causal LM")
    if isinstance(found, torch.nn.Module):
        return found, None
    from transformers import AutoModelForCausalLM

    from surgery.core.hf import architecture_class, config_dict, load_pretrained

    path = found
    cls = architecture_class(config_dict(path).get("architectures"), "AutoModelForCausalLM")
    if not hasattr(cls, "generate"):
        cls = AutoModelForCausalLM
    return load_pretrained(path, cls, attn_implementation="eager"), path


def _check_options(dtype: str, opset: int | None, exporter: str = "auto") -> int:
    """OptionError naming the field for a bad dtype, opset or exporter; returns the opset (None: the default)."""
    import onnx

    from surgery.options.export import DEFAULT_OPSET, MIN_OPSET

    opset = DEFAULT_OPSET if opset is None else opset

    if exporter not in EXPORTER_ORDER:
        raise OptionError(f"exporter {exporter!r} is not one of {', '.join(EXPORTER_ORDER)}", field="exporter")
    if dtype not in DTYPES:
        raise OptionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", field="dtype")
    top = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= top:
        raise OptionError(f"opset {opset!r} is outside {MIN_OPSET}..{top} (installed onnx)", field="opset")
    return opset


def _export_model(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """The module to trace: the model itself in fp32, a fp16 copy for fp16 (inputs are never modified)."""
    want = DTYPES[dtype]
    if next(model.parameters()).dtype == want:
        return model.eval()
    return copy.deepcopy(model).to(want).eval()


def export_decoder_with_past(model: Any, out_dir: str | Path, *, dtype: str = "fp32", opset: int | None = None,
                             validate: bool = True, new_tokens: int = 16, device: str = "auto",
                             tokenizer: Any = None, overwrite: bool = False,
                             progress: Progress | None = None, atol: float | None = None, rtol: float | None = None,
                             threads: int | None = None, manifest_extra: dict[str, Any] | None = None,
                             exporter: str = "auto") -> DecoderExport:
    """Export a causal LM with its KV cache to OUT_DIR/model.onnx (Optimum's text-generation-with-past).

    Args:
        model: a transformers causal LM, or a model directory (loaded offline, no remote code).
        out_dir: output directory, written atomically (must not exist unless overwrite).
        dtype: "fp32" or "fp16" (weights, cache and logits); opset: default export.DEFAULT_OPSET.
        validate: run validate_generation (new_tokens per prompt, on device "auto" | "cpu" | "cuda").
        tokenizer: a tokenizer (save_pretrained) or a directory whose tokenizer files are copied.
        progress: callback(stage, step, total). atol, rtol, threads: for validate_generation.
        manifest_extra: more manifest.json keys. exporter: "auto" (legacy first, checked by check_graph;
            else dynamo), "dynamo" or "legacy" (that one only); .exporter/.exporter_note say which ran.

    Returns:
        DecoderExport: paths, layout, exporter used, validation report, manifest.

    Raises:
        OptionError (bad dtype/opset/exporter/model), CheckpointError (directory cannot be loaded), SurgeryError
        (cache is not key/value tensors, e.g. Mamba; both exporters failed), ValidationError (generation
        differs; files and a "failed" manifest are written first; .report is the GenerationReport).

    Example:
        >>> m = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        ...                                  intermediate_size=128, vocab_size=100))
        >>> r = export_decoder_with_past(m, "out/llama-onnx")
        >>> r.status, r.layout.num_layers, r.validation.passed
        ('ok', 2, True)
    """
    opset = _check_options(dtype, opset, exporter)
    out_dir = Path(out_dir)
    tick: Callable[[str, int], None] = ((lambda s, i: progress(s, i, 3 + int(validate))) if progress
                                        else (lambda s, i: None))
    src_inputs = [Path(model)] if isinstance(model, (str, Path)) else []
    check_output_path(out_dir, overwrite, src_inputs)  # before the (slow) load
    torch_model, source = _load(model)
    tick("load", 1)
    with _eager_attention(torch_model):
        traced = _export_model(torch_model, dtype)
        layout = probe_layout(traced)
        with atomic_output_dir(out_dir, overwrite=overwrite, inputs=src_inputs) as tmp:
            exported = _write(tmp, torch_model, traced, layout, source, tokenizer, (dtype, opset, exporter), tick,
                              manifest_extra or {})
            _card(tmp, source, dtype, opset, exported[0])
            report = None
            if validate:
                report = _validate_into(tmp, torch_model, exported[3], new_tokens, device,
                                        {"atol": atol, "rtol": rtol, "threads": threads})
                tick("validate", 4)
    exporter, note, data, manifest, export_s = exported
    result = DecoderExport(out_dir, out_dir / MODEL_FILE, out_dir / DATA_FILE if data else None, dtype, layout,
                           exporter, note, manifest["status"], report, manifest, export_s)
    _raise_if_failed(report, out_dir)
    return result


def _card(tmp: Path, source: Path | None, dtype: str, opset: int, exporter: str) -> None:
    """A model card (README.md): what the directory is and which runtimes load it."""
    from surgery.report.cards import write_card

    write_card(tmp, "export-onnx", str(source) if source is not None else None, {"dtype": dtype, "opset": opset},
               {"variant": "text-generation-with-past (KV cache, Optimum's layout)", "exporter": exporter,
                "loads in": "optimum ORTModelForCausalLM (use_cache=True), onnxruntime-genai og.Model"},
               tags=["onnx", "text-generation"])


def _raise_if_failed(report: Any, out_dir: Path) -> None:
    """One failure path: a failed generation check raises after the files landed."""
    if report is not None and not report.passed:
        raise ValidationError(f"{report.failure_message()}; files left in {escape_name(out_dir)} (manifest status "
                              "'failed')", report=report)


def _write(tmp: Path, model: Any, traced: torch.nn.Module, layout: DecoderLayout, source: Path | None,
           tokenizer: Any, how: tuple[str, int, str], tick: Callable[[str, int], None],
           extra: dict[str, Any]) -> tuple:
    """Graph, side files, genai_config.json and a first manifest into tmp; how = (dtype, opset, exporter
    option). Returns (exporter, note, data path, manifest, export seconds)."""
    dtype, opset, asked = how
    t0 = time.perf_counter()
    wrapper = DecoderWithPast(traced, layout).eval()
    args = dummy_inputs(layout, DTYPES[dtype], next(traced.parameters()).device)
    with dense_experts(traced) as moe_note:  # MoE blocks: a traceable dense form while tracing only
        exporter, note, data = _export_graph(wrapper, args, tmp / MODEL_FILE, opset, tmp / ".scratch", asked)
    note = f"{note}; {moe_note}" if moe_note else note
    shutil.rmtree(tmp / ".scratch", ignore_errors=True)
    export_s = time.perf_counter() - t0
    tick("export", 2)
    files = _side_files(model, source, tokenizer, tmp)
    (tmp / GENAI_FILE).write_text(json.dumps(genai_config(layout, model), indent=2) + "\n")
    manifest = _manifest(layout, dtype, opset, exporter, note, tmp / MODEL_FILE, data, files, export_s) | extra
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    tick("files", 3)
    return exporter, note, data, manifest, export_s


def _validate_into(tmp: Path, model: Any, manifest: dict[str, Any], new_tokens: int,
                   device: str, check: dict[str, Any]) -> GenerationReport:
    """validate_generation on the written files; its report and the status go into the manifest."""
    report = validate_generation(model, tmp, new_tokens=new_tokens, device=device, raise_on_failure=False, **check)
    manifest["status"] = "ok" if report.passed else "failed"
    manifest["provider"], manifest["provider_note"] = report.provider, report.provider_note
    manifest["validation"] = _json_safe(dataclasses.asdict(report))
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return report


def _json_safe(obj: Any) -> Any:
    """inf/nan as strings (strict JSON has no such numbers), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def ir_version(path: Path) -> int:
    """The saved graph's IR version, read from the file's first field (protobuf writes ModelProto's
    field 1, ir_version, first) without parsing the weights; a full parse of the graph otherwise.

    Example: ir_version(Path("out/model.onnx")) -> 8"""
    import onnx

    with open(path, "rb") as f:
        head = f.read(11)
    if head[:1] == b"\x08":  # field 1, varint
        value, shift = 0, 0
        for byte in head[1:]:
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value
    return int(onnx.load(str(path), load_external_data=False).ir_version)


def _manifest(layout: DecoderLayout, dtype: str, opset: int, exporter: str, note: str, path: Path,
              data: Path | None, files: Sequence[str], export_s: float) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import transformers

    from surgery.onnx.files import max_ir_version_supported

    return {
        "status": "not validated",
        "task": "text-generation-with-past",
        "format": "text-generation-with-past",
        "variant": "with-past: one graph for prefill and decode, KV cache in and out",
        "dtype": dtype,
        "kv_dtype": dtype,
        "logits_dtype": dtype,
        "files": {"model": MODEL_FILE, "data": data.name if data else None, "genai_config": GENAI_FILE,
                  "side_files": list(files)},
        "opset": opset,
        "ir_version": ir_version(path),
        "max_ir_version_onnxruntime": max_ir_version_supported(),
        "exporter": exporter,
        "exporter_note": note,
        "export_seconds": round(export_s, 3),
        "export_shapes": {"batch_size": EXPORT_BATCH, "sequence_length": EXPORT_SEQ,
                          "past_sequence_length": EXPORT_PAST, "total_sequence_length": EXPORT_SEQ + EXPORT_PAST},
        "layout": dataclasses.asdict(layout),
        "axes": {n: {str(a): d for a, d in ax.items()} for n, ax in layout.axes().items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "provider": None,
        "provider_note": None,
        "validation": None,
    }
