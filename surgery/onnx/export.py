"""export-onnx: a (merged) model exported to ONNX and validated against PyTorch on onnxruntime.

    result = export_onnx("path/to/model", "out/", optimize=True)
    result.status, result.provider, result.validation    # "ok", "CPUExecutionProvider", [rows]

Pipeline (every step writes into a temporary sibling of OUT_DIR, renamed into place at the end):

  config.json ──(Auto classes, offline, no remote code)──► nn.Module (+ adapters merged)
      ──torch.onnx.export(dynamo=True, symbolic batch/sequence)──► model.onnx + model.onnx.data
           (legacy TorchScript exporter only if dynamo fails; the manifest says which ran and why)
      ──[optimize]──► model_optimized.onnx + .data  (ORT transformer fusions, else ORT offline opt)
      ──[fp16]──► fp16 weights, fp32 inputs/outputs
      ──validate on onnxruntime (CUDA if it really loads, else CPU) vs eager PyTorch, 3 input sets
      ──► manifest.json ("ok" / "failed"); a failed validation still lands the files, then raises.

Why the optimised variant is exported with the legacy exporter (measured on onnxruntime 1.31.1,
torch 2.13): onnxruntime.transformers' fusions match the TorchScript exporter's patterns. On a
dynamo graph of BERT/MiniLM the Attention and EmbedLayerNormalization fusions never fire (only
SkipLayerNorm/BiasGelu do), and the GPT-2 fusion pass crashes (IndexError in onnx_model_gpt2
postprocess). On the legacy graph of the same model (eager attention) 6 Attention +
1 EmbedLayerNormalization fuse for MiniLM. So `optimize` re-exports with the legacy exporter for
fusion, and falls back to onnxruntime's offline graph optimisation of the dynamo graph when the
model type has no fusion pass (Llama) or when legacy export / fusion fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import json
import logging
import os
import platform
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from surgery.errors import CheckpointError, OptionError, SurgeryError, ValidationError
from surgery.io import atomic_output_dir, check_output_path

# Offline by default; `local_files_only=True` below is the real guarantee.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

Progress = Callable[[str, int, int], None]

TASKS = ("auto", "feature-extraction", "sequence-classification", "causal-lm")
DTYPES = ("fp32", "fp16")
DEVICES = ("auto", "cpu", "cuda")
# Opset 18: the dynamo exporter's native opset in torch 2.x, has LayerNormalization (17+),
# and every onnxruntime since 1.14 runs it.
DEFAULT_OPSET = 18
MIN_OPSET = 14  # scaled_dot_product_attention / trilu need ≥ 14

# Default tolerances, per weight dtype. A value passes when |onnx − torch| ≤ atol + rtol·|torch|
# (numpy.allclose). fp16 weights keep ~3 significant digits, and errors add up over layers.
TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-3}, "fp16": {"atol": 1e-1, "rtol": 5e-2}}

# Dummy sizes for export: ≥ 2 and batch ≠ sequence so the tracer specialises neither
# (torch.export specialises sizes 0 and 1, and equal sizes can be unified into one symbol).
EXPORT_BATCH, EXPORT_SEQ = 2, 7

# model_type (config.json) -> onnxruntime.transformers.optimizer model_type with fusion passes.
FUSION_MODEL_TYPES = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert",
    "albert": "bert", "electra": "bert", "camembert": "bert", "mpnet": "bert",
    "gpt2": "gpt2", "gpt_neox": "gpt_neox", "phi": "phi",
}

MODEL_FILE = "model.onnx"
OPTIMIZED_FILE = "model_optimized.onnx"
MANIFEST_FILE = "manifest.json"


# ----------------------------------------------------------------------------- specs and results


@dataclass(frozen=True)
class InputSpec:
    """One model input. `shape` entries are ints or symbolic names ("batch", "sequence").

    Integer inputs are drawn from [low, high); float inputs from a standard normal.
    An input named "attention_mask" gets zeros at the end of some rows in the padded input set.
    """

    name: str
    shape: tuple[int | str, ...] = ("batch", "sequence")
    dtype: torch.dtype = torch.int64
    low: int = 0
    high: int = 2


@dataclass
class IOSpec:
    """Inputs in call order, and each output's symbolic axes ({axis: name})."""

    inputs: list[InputSpec]
    outputs: dict[str, dict[int, str]]
    max_sequence: int | None = None  # position limit (max_position_embeddings), if any
    pad_token_id: int = 0


@dataclass
class ValidationRow:
    """Comparison of one output on one input set (and one ONNX file)."""

    file: str
    input_set: str
    output: str
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float  # over elements with |ref| > atol (relative error is noise near zero)
    mean_abs_diff: float
    tol_ratio: float  # max |diff| / (atol + rtol·|ref|); ≤ 1 passes
    passed: bool
    top1_agreement: float | None = None  # causal LMs: argmax agreement on non-padding positions


@dataclass
class ValidationReport:
    rows: list[ValidationRow]
    provider: str
    provider_note: str
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    @property
    def worst(self) -> ValidationRow | None:
        return max(self.rows, key=lambda r: r.tol_ratio, default=None)

    def failure_message(self) -> str:
        w = self.worst
        if w is None or w.passed:
            return ""
        return (
            f"ONNX output '{w.output}' of {w.file} differs from PyTorch on input set '{w.input_set}': "
            f"max abs diff {w.max_abs_diff:.3g} exceeds atol {self.atol:g} + rtol {self.rtol:g}·|ref| "
            f"({w.tol_ratio:.3g}× the tolerance, on {self.provider})"
        )


@dataclass
class ExportResult:
    out_dir: Path
    model_path: Path
    data_path: Path
    optimized_path: Path | None
    manifest_path: Path
    manifest: dict[str, Any]
    validation: list[ValidationRow]
    provider: str | None
    provider_note: str
    exporter: str  # "dynamo" | "legacy"
    exporter_note: str
    status: str  # "ok" | "failed" | "not validated"
    benchmark: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- quiet helpers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings, torch.onnx / transformers logging and progress bars: the library never prints."""
    import transformers.utils.logging as tlog

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript",
                                               "onnx_ir", "torch.fx", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    verbosity = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        # torch.export writes the failing graph straight to sys.stderr when it refuses a model.
        sink = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _ort():
    import onnxruntime as ort

    # onnxruntime-gpu logs an error to stderr when CUDA is listed but cannot load; we report
    # the provider that ran ourselves, so keep only fatal messages.
    ort.set_default_logger_severity(4)
    return ort


# ----------------------------------------------------------------------------- IR version


@functools.lru_cache(maxsize=None)
def max_ir_version_supported() -> int:
    """Highest ONNX IR version the installed onnxruntime loads, found by trying.

    onnxruntime has no public API for this and its release notes are the only table
    (1.31.1: IR 13, while onnx 1.23 writes IR 14), so we build a one-node Identity model
    at decreasing IR versions and keep the first one an InferenceSession accepts.
    """
    import onnx
    from onnx import TensorProto, helper

    ort = _ort()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    so = ort.SessionOptions()
    so.log_severity_level = 4
    for ir in range(onnx.IR_VERSION, 6, -1):
        probe.ir_version = ir
        try:
            ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # noqa: BLE001 - any load failure means "not this version"
            continue
    return 7  # IR 7 (opset 12 era) is read by every onnxruntime we can run on


def clamp_ir_version(model_proto) -> int:
    """Lower model_proto.ir_version to what the installed onnxruntime reads; returns the new value."""
    model_proto.ir_version = min(model_proto.ir_version, max_ir_version_supported())
    return model_proto.ir_version


def save_onnx(model_proto, path: Path) -> None:
    """Save with all weights in one external file `<name>.data` beside it (works past 2 GB)."""
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    # onnx appends to an existing external-data file, so a stale one would corrupt offsets.
    # Callers hold every tensor in memory (loaded with external data) when they re-save.
    if data.exists():
        data.unlink()
    clamp_ir_version(model_proto)
    # Tensors under 1 KiB stay inline: onnxruntime's shape inference reads small constants
    # (Unsqueeze/Reshape axes) at load time and cannot take them from external data.
    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024, convert_attribute=False)
    if data.exists():
        data.chmod(0o644)  # onnx creates it 0600; a model file is meant to be shared


def _load_onnx(path: Path, with_data: bool):
    import onnx

    return onnx.load(str(path), load_external_data=with_data)


def _patch_header(path: Path) -> None:
    """Clamp the IR version of a saved model by rewriting only its graph file (data untouched)."""
    import onnx

    proto = _load_onnx(path, with_data=False)
    old = proto.ir_version
    if clamp_ir_version(proto) != old:
        onnx.save_model(proto, str(path))  # external tensors keep their location/offset entries


# ----------------------------------------------------------------------------- symbolic check


def _dims(value_info) -> list[str | int | None]:
    out: list[str | int | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        elif d.HasField("dim_value"):
            out.append(d.dim_value)
        else:
            out.append(None)
    return out


def graph_io(path: Path) -> dict[str, dict[str, list]]:
    """{"inputs": {name: dims}, "outputs": {name: dims}}, dims as saved (str = symbolic)."""
    proto = _load_onnx(path, with_data=False)
    inits = {i.name for i in proto.graph.initializer}
    return {
        "inputs": {v.name: _dims(v) for v in proto.graph.input if v.name not in inits},
        "outputs": {v.name: _dims(v) for v in proto.graph.output},
    }


def check_symbolic(path: Path, spec: IOSpec) -> dict[str, dict[str, list]]:
    """Raise ValidationError unless every axis the spec calls dynamic is a dim_param in the file."""
    gio = graph_io(path)
    wanted: list[tuple[str, str, dict[int, str]]] = [
        ("input", i.name, {a: d for a, d in enumerate(i.shape) if isinstance(d, str)}) for i in spec.inputs
    ] + [("output", name, axes) for name, axes in spec.outputs.items()]
    for kind, name, axes in wanted:
        dims = gio[kind + "s"].get(name)
        if dims is None:
            raise ValidationError(f"{path.name} has no graph {kind} named '{name}'; the export lost it")
        for axis, dim_name in axes.items():
            if axis >= len(dims) or not isinstance(dims[axis], str):
                got = dims[axis] if axis < len(dims) else "missing"
                raise ValidationError(
                    f"{path.name}: {kind} '{name}' axis {axis} ({dim_name}) is fixed to {got}, not symbolic; "
                    f"the export specialised it (a shape-dependent branch in the model?)"
                )
    return gio


# ----------------------------------------------------------------------------- model preparation


class _Wrapped(torch.nn.Module):
    """Positional inputs in spec order → tuple of outputs in spec order (what the exporters want)."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str],
                 hf: bool, extra: Mapping[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.hf = hf
        self.extra = dict(extra or {})

    def forward(self, *args: torch.Tensor):
        if self.hf:
            out = self.model(**dict(zip(self.input_names, args)), **self.extra)
        else:
            out = self.model(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, Mapping):  # dict or transformers ModelOutput
            out = tuple(out[n] for n in self.output_names)
        else:
            out = tuple(out)[: len(self.output_names)]
        return out


@dataclass
class _Prepared:
    wrapper: _Wrapped
    spec: IOSpec
    task: str
    config: Any  # transformers config, or None for a custom module
    source: str


def _read_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist; pass a Hugging Face model directory")
    if not cfg_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; export-onnx needs a Hugging Face model directory")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {cfg_path} ({e}); fix or regenerate the config") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object; fix or regenerate the config")
    if "auto_map" in raw or raw.get("trust_remote_code"):
        raise CheckpointError(
            f"{cfg_path} asks for remote code (auto_map); surgery never runs code shipped with a checkpoint — "
            f"use a model whose architecture transformers ships, or pass the module via the Python API (model=)"
        )
    return raw


def _resolve_task(task: str, raw: dict) -> str:
    if task != "auto":
        return task
    archs = raw.get("architectures") or []
    for a in archs:
        if a.endswith("ForCausalLM") or a.endswith("LMHeadModel"):
            return "causal-lm"
        if a.endswith("ForSequenceClassification"):
            return "sequence-classification"
    return "feature-extraction"


def _apply_adapters(model: torch.nn.Module, adapters: Sequence[Path]) -> torch.nn.Module:
    """Fold adapters into the loaded model's weights with surgery.ops.merge (PEFT's numerics,
    every key checked, no PEFT needed at run time)."""
    if not adapters:
        return model
    from surgery.ops.merge import apply_adapters_to_model

    apply_adapters_to_model(model, [Path(a) for a in adapters])
    return model


def _hf_spec(model: torch.nn.Module, config: Any, task: str) -> tuple[IOSpec, dict[str, Any]]:
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise CheckpointError(f"config of {config.model_type} has no vocab_size; export-onnx handles token models only")
    params = inspect.signature(model.forward).parameters
    inputs = [InputSpec("input_ids", ("batch", "sequence"), torch.int64, 0, vocab)]
    if "attention_mask" in params:
        inputs.append(InputSpec("attention_mask", ("batch", "sequence"), torch.int64, 1, 2))
    # BERT-like segment embeddings (RoBERTa has type_vocab_size 1: its tokenizers send none;
    # GPT-2's forward takes token_type_ids but has no segment table).
    n_types = int(getattr(config, "type_vocab_size", 0) or 0)
    if n_types >= 2 and "token_type_ids" in params:
        inputs.append(InputSpec("token_type_ids", ("batch", "sequence"), torch.int64, 0, n_types))
    extra: dict[str, Any] = {"return_dict": True}
    if task == "causal-lm":
        extra["use_cache"] = False  # no KV cache in or out: logits only
        outputs = {"logits": {0: "batch", 1: "sequence"}}
    elif task == "sequence-classification":
        outputs = {"logits": {0: "batch"}}
    else:
        outputs = {"last_hidden_state": {0: "batch", 1: "sequence"}}
    if "use_cache" in params and "use_cache" not in extra:
        extra["use_cache"] = False
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    pad = getattr(config, "pad_token_id", None)
    return IOSpec(inputs, outputs, int(max_pos) if max_pos else None, int(pad) if pad is not None else 0), extra


def load_hf_model(model_dir: str | Path, task: str = "auto",
                  adapters: Sequence[str | Path] = ()) -> tuple[torch.nn.Module, Any, str]:
    """Load a local Hugging Face model in fp32 with eager attention, adapters merged: (model, config, task)."""
    model_dir = Path(model_dir)
    raw = _read_config(model_dir)
    task = _resolve_task(task, raw)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    classes = {"feature-extraction": AutoModel, "sequence-classification": AutoModelForSequenceClassification,
               "causal-lm": AutoModelForCausalLM}
    if (model_dir / "factorization.json").is_file():  # a `surgery factorize` output
        from surgery.ops.factorize import load_factorized

        model = load_factorized(model_dir, torch.float32)
        model = _apply_adapters(model, [Path(a) for a in adapters])
        return model.eval(), model.config, task
    # Index the checkpoint ourselves first: shard paths must stay inside the directory,
    # headers must be sane, pickles must be weights only (transformers checks none of it).
    from surgery.io import open_checkpoint

    open_checkpoint(model_dir)
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
            # Eager attention: plain MatMul/Softmax in the graph, which both exporters handle and
            # onnxruntime's Attention fusion recognises (SDPA's mask path does not fuse).
            model = classes[task].from_pretrained(
                model_dir, config=config, dtype=torch.float32, attn_implementation="eager",
                trust_remote_code=False, local_files_only=True,
            )
    except (ValueError, KeyError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot load {model_dir} as {task} with transformers ({first}); "
                              f"check config.json's model_type/architectures and --task") from None
    model = _apply_adapters(model, [Path(a) for a in adapters])
    return model.eval(), config, task


def _prepare(model_dir, model, inputs, outputs, adapters, task) -> _Prepared:
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise OptionError(f"model= must be a torch.nn.Module, got {type(model).__name__}")
        if not inputs:
            raise OptionError("model= needs inputs=[InputSpec(...)] describing its positional inputs")
        if adapters:
            raise OptionError("adapters apply to Hugging Face model directories, not to a model= module")
        outs = dict(outputs or {"output": {0: "batch"}})
        spec = IOSpec(list(inputs), outs)
        wrapper = _Wrapped(model.eval(), [i.name for i in inputs], list(outs), hf=False)
        return _Prepared(wrapper, spec, "custom" if task == "auto" else task, None, f"module {type(model).__name__}")
    if model_dir is None:
        raise OptionError("give a model directory, or model= with inputs= from Python")
    hf, config, task = load_hf_model(model_dir, task, adapters)
    spec, extra = _hf_spec(hf, config, task)
    if outputs:
        spec.outputs = dict(outputs)
    wrapper = _Wrapped(hf, [i.name for i in spec.inputs], list(spec.outputs), hf=True, extra=extra)
    return _Prepared(wrapper.eval(), spec, task, config, str(model_dir))


# ----------------------------------------------------------------------------- input sets


def make_inputs(spec: IOSpec, batch: int, seq: int, pad_rows: Mapping[int, int] | None = None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs at (batch, seq); pad_rows {row: valid_length} zeroes attention_mask past it."""
    if spec.max_sequence:
        seq = min(seq, spec.max_sequence)
    g = torch.Generator().manual_seed(seed)
    sizes = {"batch": batch, "sequence": seq}
    out: dict[str, torch.Tensor] = {}
    for inp in spec.inputs:
        shape = [sizes.get(d, 1) if isinstance(d, str) else int(d) for d in inp.shape]
        if inp.dtype.is_floating_point:
            t = torch.randn(shape, generator=g).to(inp.dtype)
        elif inp.name == "attention_mask":
            t = torch.ones(shape, dtype=inp.dtype)
        else:
            t = torch.randint(inp.low, max(inp.high, inp.low + 1), shape, generator=g, dtype=inp.dtype)
        out[inp.name] = t
    for row, length in (pad_rows or {}).items():
        length = min(length, seq)
        if "attention_mask" in out:
            out["attention_mask"][row, length:] = 0
        if "input_ids" in out:
            out["input_ids"][row, length:] = spec.pad_token_id
    return out


def default_input_sets(spec: IOSpec) -> dict[str, dict[str, torch.Tensor]]:
    """Three sets, none at the export shape (2×7): 1×5, an odd 3×13, and a right-padded 4×11."""
    return {
        "b1_s5": make_inputs(spec, 1, 5, seed=1),
        "b3_s13": make_inputs(spec, 3, 13, seed=2),
        "b4_s11_padded": make_inputs(spec, 4, 11, pad_rows={1: 6, 3: 3}, seed=3),
    }


# ----------------------------------------------------------------------------- export


def _export_args(spec: IOSpec) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Any], ...],
                                        dict[str, dict[int, str]]]:
    """Dummy inputs at 2×7 (one row padded), dynamo Dims per input, legacy dynamic_axes."""
    ex = make_inputs(spec, EXPORT_BATCH, EXPORT_SEQ, pad_rows={1: EXPORT_SEQ - 2}, seed=0)
    dims: dict[str, Any] = {}
    dyn_shapes = []
    dyn_axes: dict[str, dict[int, str]] = {}
    for inp in spec.inputs:
        axes = {a: d for a, d in enumerate(inp.shape) if isinstance(d, str)}
        dyn_shapes.append({a: dims.setdefault(d, torch.export.Dim(d)) for a, d in axes.items()})
        dyn_axes[inp.name] = axes
    for name, axes in spec.outputs.items():
        dyn_axes[name] = dict(axes)
    return tuple(ex[i.name] for i in spec.inputs), tuple(dyn_shapes), dyn_axes


def _first_line(e: BaseException) -> str:
    """One-line reason; torch.onnx wraps the real error (its own first line is boilerplate)."""
    if e.__cause__ is not None and type(e).__name__ in ("TorchExportError", "ConversionError"):
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _export_dynamo(prep: _Prepared, path: Path, opset: int) -> None:
    args, dyn_shapes, _ = _export_args(prep.spec)
    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(
            # The wrapper's forward is `*args`: torch.export wants that one parameter's spec as a tuple.
            prep.wrapper, args, dynamo=True, opset_version=opset, dynamic_shapes=(dyn_shapes,),
            input_names=[i.name for i in prep.spec.inputs], output_names=list(prep.spec.outputs),
            external_data=True, verbose=False, report=False,
        )
        if prog is None:
            raise RuntimeError("torch.onnx.export returned no program")
        prog.save(str(path), external_data=True)
    # Normalise the weight layout to exactly one `model.onnx.data` (the exporter may inline small
    # tensors or pick another name) only when needed: re-saving rewrites every weight byte.
    data = path.with_name(path.name + ".data")
    others = [p for p in path.parent.iterdir() if p not in (path, data) and p.name.startswith(path.stem)]
    if not data.exists() or others:
        proto = _load_onnx(path, with_data=True)
        for p in others:
            p.unlink()
        save_onnx(proto, path)
    _patch_header(path)


def _export_legacy(prep: _Prepared, path: Path, opset: int, scratch: Path) -> None:
    """TorchScript exporter into scratch (it may scatter >2 GB weights into many files), then one .data file."""
    args, _, dyn_axes = _export_args(prep.spec)
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / "legacy.onnx"
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            prep.wrapper, args, str(raw), dynamo=False, opset_version=opset,
            input_names=[i.name for i in prep.spec.inputs], output_names=list(prep.spec.outputs),
            dynamic_axes=dyn_axes, do_constant_folding=True,
        )
    proto = _load_onnx(raw, with_data=True)
    save_onnx(proto, path)


def _export(prep: _Prepared, path: Path, opset: int, scratch: Path) -> tuple[str, str]:
    """Dynamo first; legacy only if dynamo fails (raises or specialises a dynamic axis). (path, note)."""
    try:
        _export_dynamo(prep, path, opset)
        check_symbolic(path, prep.spec)
        return "dynamo", "torch.onnx.export(dynamo=True) with symbolic batch/sequence dims"
    except Exception as e:  # noqa: BLE001 - any dynamo failure sends us to the fallback, with its reason
        reason = _first_line(e)
    for p in path.parent.glob(path.name + "*"):
        p.unlink()
    try:
        _export_legacy(prep, path, opset, scratch)
        check_symbolic(path, prep.spec)
    except SurgeryError:
        raise
    except Exception as e2:  # noqa: BLE001
        raise SurgeryError(f"ONNX export of {prep.source} failed with both exporters: dynamo ({reason}); "
                           f"legacy ({_first_line(e2)}); try another --opset or report the model type") from None
    return "legacy", f"dynamo export failed ({reason}); used the legacy TorchScript exporter"


# ----------------------------------------------------------------------------- optimise / fp16


def _cuda_target(device: str) -> bool:
    """Will the optimised graph run on CUDA? (The provider must exist and torch see a GPU.)"""
    if device == "cpu":
        return False
    return "CUDAExecutionProvider" in _ort().get_available_providers() and torch.cuda.is_available()


def _optimize(prep: _Prepared, plain: Path, out: Path, opset: int, scratch: Path,
              device: str = "auto") -> dict[str, Any]:
    """Write the optimised variant to `out`; returns how it was made (method, source, fused ops, notes).

    CUDA: onnxruntime's transformer fusions (its fused Attention kernel is what makes GPUs
    fast). CPU: the fused Attention op was slower than plain MatMul/Softmax (MiniLM 8x128,
    2 threads: 131 vs 116 ms; 1x128 17 vs 16 ms), so the CPU variant is the eager-attention
    (legacy-exported) graph, which onnxruntime optimises at load: the fastest variant measured."""
    notes: list[str] = []
    mt = FUSION_MODEL_TYPES.get(getattr(prep.config, "model_type", None) or "")
    if mt is not None and not _cuda_target(device):
        try:
            # Saved as exported: onnxruntime's load-time CPU optimisations (ORT_ENABLE_ALL) do
            # better on it than a graph saved after offline optimisation (16 vs 45 ms at 1x128).
            _export_legacy(prep, out, opset, scratch / "legacy_cpu")
            check_symbolic(out, prep.spec)
            return {"method": "eager-attention graph for CPU (onnxruntime optimises it at load, ORT_ENABLE_ALL)",
                    "graph_source": "legacy exporter, eager attention", "fused_ops": {}, "notes": notes}
        except SurgeryError as e:
            notes.append(f"CPU optimisation of the eager-attention graph rejected: {e}")
        except Exception as e:  # noqa: BLE001
            notes.append(f"CPU optimisation of the eager-attention graph failed ({_first_line(e)})")
        for p in out.parent.glob(out.name + "*"):
            p.unlink()
        mt = None  # fall back to optimising the plain export
        notes.append("optimised the plain export instead")
    if mt is not None:
        try:
            from onnxruntime.transformers.optimizer import optimize_model

            # Fusion patterns match the TorchScript exporter's graph (see module docstring).
            src = scratch / "for_fusion.onnx"
            _export_legacy(prep, src, opset, scratch / "legacy_fusion")
            cfg = prep.config
            heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 0)
            hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
            with _quiet():
                om = optimize_model(str(src), model_type=mt, num_heads=heads, hidden_size=hidden, opt_level=1)
            stats = {k: int(v) for k, v in om.get_fused_operator_statistics().items() if v}
            save_onnx(om.model, out)
            check_symbolic(out, prep.spec)
            make_session(out, "cpu")  # fusion passes can emit graphs onnxruntime rejects (GPT-2 at opset 18)
            return {"method": f"onnxruntime.transformers.optimizer (model_type={mt}, opt_level=1)",
                    "graph_source": "legacy exporter, eager attention", "fused_ops": stats, "notes": notes}
        except SurgeryError as e:
            notes.append(f"fusion result rejected: {e}")
        except Exception as e:  # noqa: BLE001 - the fusion passes crash on graphs they don't expect
            notes.append(f"transformer fusion failed ({_first_line(e)})")
        for p in out.parent.glob(out.name + "*"):
            p.unlink()
    else:
        notes.append(f"no onnxruntime fusion pass for model_type {getattr(prep.config, 'model_type', None)!r}")
    _ort_offline(plain, out)
    check_symbolic(out, prep.spec)
    return {"method": "onnxruntime offline graph optimisation (ORT_ENABLE_EXTENDED, CPU)",
            "graph_source": "plain export", "fused_ops": {}, "notes": notes}


def _ort_offline(src: Path, out: Path) -> None:
    """onnxruntime's own graph optimisations, saved (weights as external data)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    _patch_header(out)


def _to_fp16(path: Path) -> None:
    """fp16 weights and compute, fp32 graph inputs/outputs (Cast nodes at the boundary)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = _load_onnx(path, with_data=True)
    big = proto.ByteSize() > 2**31 - 1  # shape inference serialises the model: not past 2 GB
    with _quiet():
        proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=big)
    save_onnx(proto, path)


# ----------------------------------------------------------------------------- the command


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """inf/nan (shape mismatch, non-finite output) as strings: strict JSON has no such numbers."""
    return {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}


def _check_options(task, dtype, device, opset, atol, rtol) -> None:
    if task not in TASKS and task != "custom":
        raise OptionError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if dtype not in DTYPES:
        raise OptionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise OptionError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    import onnx

    top = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise OptionError(f"opset {opset!r} is outside {MIN_OPSET}..{top} (installed onnx); "
                          f"use --opset {DEFAULT_OPSET}")
    for name, v in (("atol", atol), ("rtol", rtol)):
        if v is not None and not (isinstance(v, (int, float)) and v >= 0 and np.isfinite(v)):
            raise OptionError(f"{name} must be a finite number ≥ 0, got {v!r}")


def export_onnx(model_dir: str | Path | None, out_dir: str | Path, *, model: torch.nn.Module | None = None,
                inputs: Sequence[InputSpec] | None = None, outputs: Mapping[str, Mapping[int, str]] | None = None,
                adapters: Sequence[str | Path] = (), task: str = "auto", opset: int = DEFAULT_OPSET,
                dtype: str = "fp32", device: str = "auto", optimize: bool = False, atol: float | None = None,
                rtol: float | None = None, validate: bool = True, benchmark: bool = False,
                benchmark_threads: int | None = None, overwrite: bool = False,
                progress: Progress | None = None) -> ExportResult:
    """Export a model directory (or model= module with inputs=) to OUT_DIR/model.onnx (+ .data), validated.

    Raises ValidationError after writing the files and a manifest with status "failed" when an
    ONNX output differs from PyTorch beyond atol + rtol·|ref|.
    """
    _check_options(task, dtype, device, opset, atol, rtol)
    out_dir = Path(out_dir)
    tol = {"atol": TOLERANCES[dtype]["atol"] if atol is None else float(atol),
           "rtol": TOLERANCES[dtype]["rtol"] if rtol is None else float(rtol)}
    steps = 2 + int(optimize) + int(dtype == "fp16") + int(validate) + int(benchmark)
    step = 0

    def tick(stage: str) -> None:
        nonlocal step
        step += 1
        if progress:
            progress(stage, step, steps)

    input_paths = [Path(p) for p in ([model_dir] if model_dir is not None else []) + list(adapters)]
    check_output_path(out_dir, overwrite, input_paths)  # refuse before the (slow) model load
    prep = _prepare(Path(model_dir) if model_dir is not None else None, model, inputs, outputs, adapters, task)
    tick("load")
    report: ValidationReport | None = None
    run_error: str | None = None
    bench_rows: list[dict[str, Any]] = []
    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=input_paths) as tmp:
        scratch = tmp / ".scratch"
        plain = tmp / MODEL_FILE
        exporter, exporter_note = _export(prep, plain, opset, scratch)
        tick("export")
        files = {"plain": plain}
        opt_info = None
        if optimize:
            opt_info = _optimize(prep, plain, tmp / OPTIMIZED_FILE, opset, scratch, device)
            files["optimized"] = tmp / OPTIMIZED_FILE
            tick("optimize")
        if dtype == "fp16":
            for p in files.values():
                _to_fp16(p)
            tick("fp16")
        gio = {k: check_symbolic(p, prep.spec) for k, p in files.items()}
        if validate:
            rows: list[ValidationRow] = []
            provider, note = "", ""
            for p in files.values():
                try:
                    r = validate_onnx(p, prep.wrapper, prep.task, spec=prep.spec, dtype=dtype, atol=tol["atol"],
                                      rtol=tol["rtol"], device=device, raise_on_failure=False)
                except ValidationError as e:  # onnxruntime cannot load/run it: land the files anyway
                    run_error = str(e)
                    break
                rows += r.rows
                provider, note = r.provider, r.provider_note
            report = ValidationReport(rows, provider, note, tol["atol"], tol["rtol"])
            tick("validate")
        failed = report is not None and (run_error is not None or not report.passed)
        if benchmark and not failed:
            bench_rows = benchmark_onnx(files, prep.wrapper, prep.task, spec=prep.spec, device=device,
                                        threads=benchmark_threads)
            tick("benchmark")
        status = "not validated" if report is None else ("failed" if failed else "ok")
        manifest = {
            "status": status,
            "source": prep.source,
            "adapters": [str(a) for a in adapters],
            "task": prep.task,
            "model_type": getattr(prep.config, "model_type", None),
            "versions": _versions(),
            "opset": opset,
            "ir_version": _load_onnx(plain, with_data=False).ir_version,
            "max_ir_version_onnxruntime": max_ir_version_supported(),
            "dtype": dtype,
            "io_dtypes": "fp32 inputs/outputs" if dtype == "fp16" else "as exported",
            "exporter": exporter,
            "exporter_note": exporter_note,
            "export_shapes": {"batch": EXPORT_BATCH, "sequence": EXPORT_SEQ},
            "files": {k: {"model": p.name, "data": p.name + ".data"} for k, p in files.items()},
            "inputs": [{"name": i.name, "dtype": str(i.dtype).replace("torch.", ""),
                        "dims": gio["plain"]["inputs"].get(i.name),
                        "dynamic_axes": {str(a): d for a, d in enumerate(i.shape) if isinstance(d, str)}}
                       for i in prep.spec.inputs],
            "outputs": [{"name": n, "dims": gio["plain"]["outputs"].get(n),
                         "dynamic_axes": {str(a): d for a, d in axes.items()}}
                        for n, axes in prep.spec.outputs.items()],
            "optimization": opt_info,
            "tolerances": {**tol, "rule": "|onnx - torch| <= atol + rtol*|torch|, non-padding positions"},
            "validation": None if report is None else {
                "execution_provider": report.provider,
                "provider_note": report.provider_note,
                "passed": not failed,
                "error": run_error,
                "rows": [_json_safe(dataclasses.asdict(r)) for r in report.rows],
            },
            "benchmark": bench_rows or None,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        shutil.rmtree(scratch, ignore_errors=True)
    result = ExportResult(
        out_dir=out_dir, model_path=out_dir / MODEL_FILE, data_path=out_dir / (MODEL_FILE + ".data"),
        optimized_path=out_dir / OPTIMIZED_FILE if optimize else None, manifest_path=out_dir / MANIFEST_FILE,
        manifest=manifest, validation=report.rows if report else [],
        provider=(report.provider or None) if report else None, provider_note=report.provider_note if report else "",
        exporter=exporter, exporter_note=exporter_note,
        status=status, benchmark=bench_rows,
    )
    if failed:  # after the files landed, for inspection
        why = run_error or report.failure_message()
        raise ValidationError(f"{why}; files left in {out_dir} (manifest status 'failed')")
    return result


# validation and benchmarks live in onnx_check.py (imported last: it uses the names above)
from surgery.onnx.check import benchmark_onnx, make_session, validate_onnx  # noqa: E402,F401
