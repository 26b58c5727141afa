"""Encoder-decoder models (T5, BART, Marian, Whisper) exported to ONNX in Optimum's seq2seq layout.

    result = export_seq2seq(model, "out/")                           # validated by greedy generation
    ORTModelForSeq2SeqLM.from_pretrained("out/", use_cache=True)      # Optimum reads it as its own export
    ORTModelForSpeechSeq2Seq.from_pretrained("out/", use_cache=True)  # Whisper

Files and names are those optimum-onnx 0.1.0 writes for `text2text-generation-with-past`
(`automatic-speech-recognition-with-past` for Whisper), without its merged decoder
(decoder_model_merged.onnx, an If node over the two decoders): Optimum loads the two-decoder
layout when no merged file is present.

  encoder_model.onnx           input_ids, attention_mask (batch_size, encoder_sequence_length)
                               [Whisper: input_features (batch_size, mel bins, frames), frames fixed]
                               -> last_hidden_state (batch_size, encoder_sequence_length, d_model)
  decoder_model.onnx           encoder_attention_mask [not Whisper], input_ids (batch_size, decoder_sequence_length),
                               encoder_hidden_states -> logits, present.{i}.decoder.key/value,
                               present.{i}.encoder.key/value   (the first step: no past)
  decoder_with_past_model.onnx encoder_attention_mask [not Whisper], input_ids,
                               past_key_values.{i}.decoder.key/value (batch_size, heads, past_decoder_sequence_length,
                               head_dim), past_key_values.{i}.encoder.key/value (…, encoder_sequence_length, …)
                               -> logits, present.{i}.decoder.key/value (…, past + decoder_sequence_length, …)

The wrappers take flat tensors and build transformers' EncoderDecoderCache inside, so no exporter
sees a Cache object; the cross-attention cache fed to decoder_with_past is marked computed, so the
graph never recomputes it from encoder states. The export machinery (exporter "auto":
legacy first, each graph checked at other sizes through the wrapper's check_inputs(), dynamo as
fallback; axes renamed to Optimum's names and checked symbolic, IR clamp, side files) is
surgery.onnx.decoder's; the check is surgery.onnx.seq2seq_check.validate_seq2seq.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.errors import OptionError, SurgeryError
from surgery.io import atomic_output_dir, check_output_path
from surgery.onnx.decoder import (
    DTYPES,
    _cache_pairs,
    _check_options,
    _config_int,
    _eager_attention,
    _export_graph,
    _export_model,
    _json_safe,
    _raise_if_failed,
    _side_files,
    model_or_dir,
)
from surgery.onnx.decoder_check import MANIFEST_FILE, GenerationReport
from surgery.onnx.seq2seq_check import (
    DECODER_FILE,
    DECODER_PAST_FILE,
    ENCODER_FILE,
    S2S_PAST,
    S2S_PRESENT,
    validate_seq2seq,
)

Progress = Callable[[str, int, int], None]

#: Optimum's axis names for the seq2seq graphs
BATCH, ENC_SEQ, DEC_SEQ = "batch_size", "encoder_sequence_length", "decoder_sequence_length"
PAST_DEC = "past_decoder_sequence_length"
DEC_TOTAL = "past_decoder_sequence_length + decoder_sequence_length"
_KINDS = ("decoder.key", "decoder.value", "encoder.key", "encoder.value")

#: dummy sizes: all >= 2 and pairwise different, so the exporter specialises and unifies none
EXPORT_BATCH, EXPORT_DEC_SEQ, EXPORT_PAST, EXPORT_ENC_SEQ = 3, 5, 7, 9


@dataclass(frozen=True)
class Seq2SeqLayout:
    """The decoder cache (from one probe forward) and the encoder's input kind."""

    model_type: str
    num_layers: int  # decoder layers
    num_heads: int  # heads of the cached keys/values
    head_dim: int
    d_model: int
    vocab_size: int
    speech: bool  # encoder takes input_features (Whisper), decoders take no encoder_attention_mask
    num_mel_bins: int | None
    frames: int | None  # Whisper's fixed input length (2 x max_source_positions)
    cache_arg: str  # "cache" (transformers 5) or "past_key_values"


@dataclass(frozen=True)
class GraphSpec:
    """One graph's input/output names and symbolic axes (what decoder._export_graph and name_axes read)."""

    input_names: list[str]
    output_names: list[str]
    axes_map: dict[str, dict[int, str]] = field(default_factory=dict)

    def axes(self) -> dict[str, dict[int, str]]:
        """{input/output name: {axis: Optimum's symbolic name}}."""
        return self.axes_map


def _names(template: str, layers: int, kinds: tuple[str, ...]) -> list[str]:
    return [template % (i, k) for i in range(layers) for k in kinds]


def graph_specs(lay: Seq2SeqLayout) -> dict[str, GraphSpec]:
    """{file name: GraphSpec} of the three graphs, in Optimum's input order."""
    past_all, pres_all = _names(S2S_PAST, lay.num_layers, _KINDS), _names(S2S_PRESENT, lay.num_layers, _KINDS)
    pres_dec = _names(S2S_PRESENT, lay.num_layers, _KINDS[:2])
    mask = [] if lay.speech else ["encoder_attention_mask"]
    hidden = {0: BATCH, 1: ENC_SEQ}
    if lay.speech:
        enc = GraphSpec(["input_features"], ["last_hidden_state"],
                        {"input_features": {0: BATCH}, "last_hidden_state": {0: BATCH}})
    else:
        enc = GraphSpec(["input_ids", "attention_mask"], ["last_hidden_state"],
                        {"input_ids": hidden, "attention_mask": hidden, "last_hidden_state": hidden})
    common = {n: hidden for n in mask} | {"input_ids": {0: BATCH, 1: DEC_SEQ}, "logits": {0: BATCH, 1: DEC_SEQ}}
    first_axes = dict(common, encoder_hidden_states=hidden)
    for n in pres_all:  # present.* are (batch, heads, length, head_dim): the length is axis 2
        first_axes[n] = {0: BATCH, 2: DEC_SEQ if ".decoder." in n else ENC_SEQ}
    past_axes = dict(common)
    past_axes.update({n: {0: BATCH, 2: PAST_DEC if ".decoder." in n else ENC_SEQ} for n in past_all})
    past_axes.update({n: {0: BATCH, 2: DEC_TOTAL} for n in pres_dec})
    return {
        ENCODER_FILE: enc,
        DECODER_FILE: GraphSpec(mask + ["input_ids", "encoder_hidden_states"], ["logits"] + pres_all, first_axes),
        DECODER_PAST_FILE: GraphSpec(mask + ["input_ids"] + past_all, ["logits"] + pres_dec, past_axes),
    }


def _seq2seq_cache(cache: Any) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, ...]]]:
    """(self-attention pairs, cross-attention pairs) of an EncoderDecoderCache; SurgeryError otherwise."""
    self_c, cross_c = getattr(cache, "self_attention_cache", None), getattr(cache, "cross_attention_cache", None)
    if self_c is None or cross_c is None:
        raise SurgeryError(f"the model returned a {type(cache).__name__} cache, not an EncoderDecoderCache of "
                           "keys and values; the text2text-generation-with-past layout cannot carry it (set "
                           "cache=False, task text2text-generation)")
    return _cache_pairs(self_c), _cache_pairs(cross_c)  # type: ignore[return-value]


def probe_seq2seq(model: Any) -> Seq2SeqLayout:
    """Read the decoder's cache layout from one short forward with use_cache=True.

    Raises SurgeryError for a model without an EncoderDecoderCache of key/value tensors, or whose
    layers (self- and cross-attention) cache different shapes."""
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    vocab, d_model = _config_int(cfg, "vocab_size"), _config_int(cfg, "d_model", "hidden_size")
    if not getattr(cfg, "is_encoder_decoder", False) or vocab is None or d_model is None or cache_arg not in params:
        raise SurgeryError(f"{type(model).__name__} is not an encoder-decoder with a cache (config is_encoder_decoder, "
                           "vocab_size, d_model); export it with its own task")
    speech = "input_features" in params
    mels, src = _config_int(cfg, "num_mel_bins"), _config_int(cfg, "max_source_positions")
    frames = 2 * src if speech and src else None
    start = _config_int(cfg, "decoder_start_token_id") or 0
    p = next(model.parameters())
    enc = ({"input_features": torch.zeros(1, mels or 80, frames or 3000, dtype=p.dtype, device=p.device)} if speech
           else {"input_ids": torch.tensor([[3, 4, 5]], device=p.device) % vocab})
    from surgery.core.hf import quiet

    with quiet(), torch.no_grad():
        out = model(**enc, decoder_input_ids=torch.tensor([[start]], device=p.device), use_cache=True)
    cache = out["cache"] if "cache" in out else out.get("past_key_values")
    if cache is None:
        raise SurgeryError(f"{type(model).__name__} returned no cache with use_cache=True; export it with cache=False")
    pairs = [pair for part in _seq2seq_cache(cache) for pair in part]
    shapes = {(k.shape[1], k.shape[3], v.shape[1], v.shape[3]) for k, v in pairs if k.dim() == 4 and v.dim() == 4}
    if len(shapes) != 1 or any(k.dim() != 4 for k, _ in pairs):
        raise SurgeryError(f"the model's layers cache tensors of different shapes ({sorted(shapes)}); the "
                           "seq2seq with-past layout needs one (heads, head_dim) for every layer")
    heads, head_dim, _, _ = shapes.pop()
    return Seq2SeqLayout(str(getattr(cfg, "model_type", "")), len(pairs) // 2, int(heads), int(head_dim), d_model,
                         vocab, speech, mels, frames, cache_arg)


# ----------------------------------------------------------------------------- the exported modules


class EncoderGraph(torch.nn.Module):
    """(input_ids, attention_mask) or (input_features,) -> last_hidden_state: the model's encoder."""

    def __init__(self, model: Any, lay: Seq2SeqLayout, spec: GraphSpec):
        super().__init__()
        self.encoder = model.get_encoder()
        self.s2s, self.layout = lay, spec

    def check_inputs(self) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
        """decoder.check_graph's input sets: CHECK_SIZES, unpadded."""
        return _check_sets(self)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.s2s.speech:
            out = self.encoder(input_features=args[0], return_dict=True)
        else:
            out = self.encoder(input_ids=args[0], attention_mask=args[1], return_dict=True)
        return out["last_hidden_state"]


class DecoderGraph(torch.nn.Module):
    """One decoder graph over flat tensors (GraphSpec input order), EncoderDecoderCache inside.

    with_past False (decoder_model): [encoder_attention_mask], input_ids, encoder_hidden_states ->
    logits, self- and cross-attention presents. with_past True (decoder_with_past_model):
    [encoder_attention_mask], input_ids, past (decoder key/value, encoder key/value per layer) ->
    logits, self-attention presents; the cross cache is marked computed, so the encoder states
    (zeros of the right shape) are never read."""

    def __init__(self, model: Any, lay: Seq2SeqLayout, spec: GraphSpec, with_past: bool):
        super().__init__()
        self.model, self.s2s, self.layout, self.with_past = model, lay, spec, with_past

    def check_inputs(self) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
        """decoder.check_graph's input sets: CHECK_SIZES, unpadded."""
        return _check_sets(self)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        lay = self.s2s
        mask, ids, rest = (None, args[0], args[1:]) if lay.speech else (args[0], args[1], args[2:])
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        if self.with_past:
            for i in range(lay.num_layers):
                dk, dv, ek, ev = rest[4 * i: 4 * i + 4]
                cache.self_attention_cache.update(dk, dv, i)
                cache.cross_attention_cache.update(ek, ev, i)
                cache.is_updated[i] = True
            hidden = rest[2].new_zeros(rest[2].shape[0], rest[2].shape[2], lay.d_model)
        else:
            hidden = rest[0]
        kwargs: dict[str, Any] = {"decoder_input_ids": ids, lay.cache_arg: cache, "use_cache": True,
                                  "encoder_outputs": BaseModelOutput(last_hidden_state=hidden), "return_dict": True}
        if mask is not None:
            kwargs["attention_mask"] = mask
        out = self.model(**kwargs)
        selfs, cross = _seq2seq_cache(out["cache"] if "cache" in out else out["past_key_values"])
        flat: list[torch.Tensor] = []
        for i in range(lay.num_layers):
            flat += [*selfs[i]] + ([] if self.with_past else [*cross[i]])
        return (out["logits"], *flat)


#: (batch, encoder sequence, decoder sequence, past) of the legacy graphs' check: other sizes than the export's
CHECK_SIZES = ((2, 4, 3, 6), (1, 6, 1, 2))


def dummy_inputs(lay: Seq2SeqLayout, spec: GraphSpec, dtype: torch.dtype, device: torch.device | str = "cpu",
                 sizes: tuple[int, int, int, int] = (EXPORT_BATCH, EXPORT_ENC_SEQ, EXPORT_DEC_SEQ, EXPORT_PAST),
                 padded: bool = True) -> tuple[torch.Tensor, ...]:
    """Inputs in spec.input_names order at sizes (batch, encoder seq, decoder seq, past; the export's by
    default); padded: row 0 of the encoder mask is right-padded by two (else all ones)."""
    g = torch.Generator().manual_seed(0)
    b, s, d, past = sizes
    mask = torch.ones(b, s, dtype=torch.long)
    if padded:
        mask[0, -2:] = 0
    made: dict[str, torch.Tensor] = {
        "input_features": torch.randn(b, lay.num_mel_bins or 80, lay.frames or 3000, generator=g).to(dtype),
        "attention_mask": mask, "encoder_attention_mask": mask,
        "encoder_hidden_states": torch.randn(b, s, lay.d_model, generator=g).to(dtype)}
    out = []
    for name in spec.input_names:
        if name == "input_ids":
            out.append(torch.randint(0, lay.vocab_size, (b, s if "attention_mask" in spec.input_names else d),
                                     generator=g))
        elif name.startswith("past_key_values."):
            length = past if ".decoder." in name else s
            out.append(torch.randn(b, lay.num_heads, length, lay.head_dim, generator=g).to(dtype))
        else:
            out.append(made[name])
    return tuple(t.to(device) for t in out)


# ----------------------------------------------------------------------------- the entry point


@dataclass
class Seq2SeqExport:
    """What export_seq2seq wrote, and how it checked."""

    out_dir: Path
    files: dict[str, str]  # "encoder" / "decoder" / "decoder_with_past" -> file name
    dtype: str
    layout: Seq2SeqLayout
    exporter: str  # "dynamo" | "legacy" | "mixed" (one entry per graph in the manifest)
    status: str  # "ok" | "failed" | "not validated"
    validation: GenerationReport | None
    manifest: dict[str, Any]
    export_seconds: float


def _load(model: Any) -> tuple[torch.nn.Module, Path | None]:
    """A transformers encoder-decoder, or a directory loaded with surgery.onnx.model.load_hf_model."""
    path = model_or_dir(model, "encoder-decoder")
    if isinstance(path, torch.nn.Module):
        return path, None
    from surgery.onnx.model import load_hf_model

    loaded, _, _ = load_hf_model(path, "auto")
    return loaded, path


def _export_graphs(tmp: Path, traced: torch.nn.Module, lay: Seq2SeqLayout, dtype: str, opset: int,
                   with_past: bool, exporter: str = "auto") -> dict[str, Any]:
    """The three (two without past) graphs into tmp: {file: {"exporter", "note", "data"}}."""
    specs = graph_specs(lay)
    device = next(traced.parameters()).device
    done: dict[str, Any] = {}
    for name, spec in specs.items():
        if name == DECODER_PAST_FILE and not with_past:
            continue
        wrapper: torch.nn.Module = (EncoderGraph(traced, lay, spec) if name == ENCODER_FILE
                                    else DecoderGraph(traced, lay, spec, name == DECODER_PAST_FILE))
        args = dummy_inputs(lay, spec, DTYPES[dtype], device)
        used, note, data = _export_graph(wrapper.eval(), args, tmp / name, opset, tmp / ".scratch", exporter)
        done[name] = {"exporter": used, "note": note, "data": data.name if data else None}
    import shutil

    shutil.rmtree(tmp / ".scratch", ignore_errors=True)
    return done


def _manifest(lay: Seq2SeqLayout, task: str, dtype: str, opset: int, graphs: dict[str, Any],
              side: list[str], export_s: float) -> dict[str, Any]:
    import platform

    import onnx
    import onnxruntime
    import transformers

    specs = graph_specs(lay)
    return {
        "status": "not validated", "task": task, "format": task,
        "variant": ("seq2seq with past: encoder + first-step decoder + decoder with KV cache (Optimum's layout, "
                    "no merged decoder)" if DECODER_PAST_FILE in graphs else "seq2seq without cache"),
        "dtype": dtype, "opset": opset,
        "files": {"graphs": graphs, "side_files": side},
        "exporter": "/".join(sorted({g["exporter"] for g in graphs.values()})),
        "export_seconds": round(export_s, 3),
        "export_shapes": {BATCH: EXPORT_BATCH, DEC_SEQ: EXPORT_DEC_SEQ, PAST_DEC: EXPORT_PAST, ENC_SEQ: EXPORT_ENC_SEQ},
        "layout": dataclasses.asdict(lay),
        "axes": {f: {n: {str(a): d for a, d in ax.items()} for n, ax in specs[f].axes().items()} for f in graphs},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "provider": None, "provider_note": None, "validation": None,
    }


def _write_manifest(tmp: Path, manifest: dict[str, Any]) -> None:
    (tmp / MANIFEST_FILE).write_text(json.dumps(_json_safe(manifest), indent=2, default=str) + "\n")


def _card(tmp: Path, source: Path | None, task: str, dtype: str, opset: int, exporter: str) -> None:
    from surgery.report.cards import write_card

    speech = task.startswith("automatic-speech")
    runtime = "ORTModelForSpeechSeq2Seq" if speech else "ORTModelForSeq2SeqLM"
    write_card(tmp, "export-onnx", str(source) if source is not None else None, {"dtype": dtype, "opset": opset},
               {"variant": f"{task} (Optimum's encoder/decoder layout)", "exporter": exporter,
                "loads in": f"optimum {runtime} (use_cache=True when decoder_with_past_model.onnx is present)"},
               tags=["onnx", "automatic-speech-recognition" if speech else "text2text-generation"])


#: files beside the graphs that seq2seq tokenizers / feature extractors need besides decoder.SIDE_FILES
EXTRA_SIDE_FILES = ("source.spm", "target.spm", "preprocessor_config.json", "normalizer.json")


def _side(model: Any, source: Path | None, tokenizer: Any, tmp: Path) -> list[str]:
    import shutil

    names = _side_files(model, source, tokenizer, tmp)
    folder = source if source is not None else (Path(tokenizer) if isinstance(tokenizer, (str, Path)) else None)
    for name in EXTRA_SIDE_FILES:
        if folder is not None and (folder / name).is_file():
            shutil.copy2(folder / name, tmp / name)
            names.append(name)
    return sorted(names)


def _check_sets(graph: Any) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """[(label, inputs)] at CHECK_SIZES for an EncoderGraph/DecoderGraph, on its weights' dtype and device."""
    p = next(graph.parameters())
    return [(f"batch {b}, encoder sequence {s}, decoder sequence {d}, past {past}",
             dummy_inputs(graph.s2s, graph.layout, p.dtype, p.device, (b, s, d, past), padded=False))
            for b, s, d, past in CHECK_SIZES]


def default_task(lay: Seq2SeqLayout, with_past: bool) -> str:
    """Optimum's task name for the layout: automatic-speech-recognition-with-past for Whisper,
    text2text-generation[-with-past] otherwise."""
    if lay.speech:
        return "automatic-speech-recognition" + ("-with-past" if with_past else "")
    return "text2text-generation" + ("-with-past" if with_past else "")


def export_seq2seq(model: Any, out_dir: str | Path, *, with_past: bool = True, dtype: str = "fp32",
                   opset: int | None = None, validate: bool = True, new_tokens: int = 8, device: str = "auto",
                   tokenizer: Any = None, overwrite: bool = False, progress: Progress | None = None,
                   atol: float | None = None, rtol: float | None = None, threads: int | None = None,
                   manifest_extra: dict[str, Any] | None = None, exporter: str = "auto") -> Seq2SeqExport:
    """Export an encoder-decoder (T5, BART, Marian, Whisper) in Optimum's seq2seq layout, validated by generation.

    Args:
        model: a transformers *ForConditionalGeneration model, or a model directory (offline, no remote code).
        out_dir: output directory, written atomically (must not exist unless overwrite).
        with_past: also write decoder_with_past_model.onnx (the KV cache); False: encoder + decoder only.
        dtype: "fp32" or "fp16"; opset: default options.export.DEFAULT_OPSET.
        validate: run seq2seq_check.validate_seq2seq (new_tokens per source set, on device, threads).
        tokenizer: a tokenizer (save_pretrained) or a directory whose tokenizer files are copied.
        progress: callback(stage, step, total). atol, rtol: validation tolerances.
        manifest_extra: more manifest.json keys.
        exporter: "auto" (legacy first, checked against PyTorch at other sizes; else dynamo), "dynamo", "legacy".

    Returns:
        Seq2SeqExport: files, layout, exporter, validation report, manifest.

    Raises:
        OptionError (bad dtype/opset/model), CheckpointError (directory cannot be loaded), SurgeryError
        (no EncoderDecoderCache of keys/values; both exporters failed: nothing written), ValidationError
        (generation differs; the files and a "failed" manifest land first; .report is the GenerationReport).

    Example:
        export_seq2seq(T5ForConditionalGeneration(T5Config(d_model=32, num_layers=2)), "out/t5").status  # 'ok'
    """
    from surgery.options.export import DEFAULT_OPSET

    opset = DEFAULT_OPSET if opset is None else opset
    _check_options(dtype, opset, exporter)
    out_dir, steps = Path(out_dir), 3 + int(validate)
    tick: Callable[[str, int], None] = (lambda s, i: progress(s, i, steps)) if progress else (lambda s, i: None)
    src_inputs = [Path(model)] if isinstance(model, (str, Path)) else []
    check_output_path(out_dir, overwrite, src_inputs)
    torch_model, source = _load(model)
    tick("load", 1)
    with _eager_attention(torch_model):
        traced = _export_model(torch_model, dtype)
        lay = probe_seq2seq(traced)
        task = default_task(lay, with_past)
        with atomic_output_dir(out_dir, overwrite=overwrite, inputs=src_inputs) as tmp:
            t0 = time.perf_counter()
            graphs = _export_graphs(tmp, traced, lay, dtype, opset, with_past, exporter)
            export_s = time.perf_counter() - t0
            tick("export", 2)
            manifest = _manifest(lay, task, dtype, opset, graphs, _side(torch_model, source, tokenizer, tmp),
                                 export_s) | (manifest_extra or {})
            _write_manifest(tmp, manifest)
            _card(tmp, source, task, dtype, opset, manifest["exporter"])
            tick("files", 3)
            check = {"atol": atol, "rtol": rtol, "threads": threads}
            report = _validate_into(tmp, torch_model, manifest, new_tokens, device, check) if validate else None
            tick("validate", 4) if validate else None
    result = Seq2SeqExport(out_dir, {_ROLE[f]: f for f in graphs}, dtype, lay, manifest["exporter"],
                           manifest["status"], report, manifest, export_s)
    _raise_if_failed(report, out_dir)
    return result


def _validate_into(tmp: Path, model: Any, manifest: dict[str, Any], new_tokens: int, device: str,
                   check: dict[str, Any]) -> GenerationReport:
    """validate_seq2seq on the written files; its report and the status go into the manifest."""
    report = validate_seq2seq(model, tmp, new_tokens=new_tokens, device=device, raise_on_failure=False, **check)
    manifest.update(status="ok" if report.passed else "failed", provider=report.provider,
                    provider_note=report.provider_note, validation=dataclasses.asdict(report))
    _write_manifest(tmp, manifest)
    return report


_ROLE = {ENCODER_FILE: "encoder", DECODER_FILE: "decoder", DECODER_PAST_FILE: "decoder_with_past"}


# ----------------------------------------------------------------------------- export-onnx dispatch

#: export-onnx task -> the task table's loader task (surgery.onnx.tasks)
_LOADER_TASK = {"text2text-generation": "text2text-generation",
                "text2text-generation-with-past": "text2text-generation",
                "automatic-speech-recognition-with-past": "speech2seq-lm"}


def seq2seq_task(model_dir: str | Path | None, opts: Any) -> str | None:
    """The loader task ("text2text-generation" or "speech2seq-lm") when export_onnx exports `model_dir`
    as an encoder-decoder: one of options.export.SEQ2SEQ_TASKS, or task auto on a checkpoint whose
    architectures name a *ForConditionalGeneration seq2seq class (T5, BART, Marian, Whisper); else None.

    Raises CheckpointError for an unreadable config.json.

    Example: seq2seq_task("t5-dir", ExportOptions()) == "text2text-generation"."""
    if opts.task in _LOADER_TASK:
        return _LOADER_TASK[opts.task]
    if model_dir is None or opts.task != "auto":
        return None
    from surgery.onnx.model import read_config, resolve_task

    task = resolve_task("auto", read_config(Path(model_dir)))
    return task if task in ("text2text-generation", "speech2seq-lm") else None


def export_seq2seq_dir(model_dir: str | Path | None, out_dir: str | Path, opts: Any, model: Any = None,
                       progress: Progress | None = None) -> Seq2SeqExport:
    """export_onnx's seq2seq branch: a directory (adapters merged in memory) or a module, exported by
    export_seq2seq with ExportOptions (cache=False, or task text2text-generation: no with-past graph).

    Raises OptionError for options the seq2seq export does not take (optimize, quantize, benchmark),
    and what export_seq2seq and surgery.onnx.model.load_hf_model raise."""
    for name in ("optimize", "benchmark"):
        if getattr(opts, name):
            raise OptionError(f"{name} is not available for the encoder-decoder export (task {opts.task}); "
                              f"turn it off", field=name)
    if opts.quantize is not None:
        raise OptionError(f"quantize is not available for the encoder-decoder export (task {opts.task})",
                          field="quantize")
    with_past = opts.cache and opts.task != "text2text-generation"
    extra: dict[str, Any] = {"adapters": [str(a) for a in opts.adapters]}
    if model is None:
        from surgery.onnx.model import load_hf_model

        loader = seq2seq_task(model_dir, opts) or "text2text-generation"
        model, _, _ = load_hf_model(Path(model_dir or ""), loader, opts.adapters,
                                    allow_random_head=opts.allow_random_head)
        extra["source"] = str(model_dir)
    from surgery.core.hf import torch_threads

    with torch_threads(opts.threads):
        return export_seq2seq(model, out_dir, with_past=with_past, dtype=opts.dtype, opset=opts.opset,
                              validate=opts.validation, device=opts.device,
                              tokenizer=Path(model_dir) if model_dir is not None else None,
                              overwrite=opts.overwrite, progress=progress, atol=opts.atol, rtol=opts.rtol,
                              threads=opts.threads, manifest_extra=extra, exporter=opts.exporter)
