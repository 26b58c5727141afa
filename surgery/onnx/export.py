"""export-onnx: a (merged) model exported to ONNX and validated against PyTorch on onnxruntime.

    result = export_onnx("path/to/model", "out/", optimize=True)
    result.status, result.provider, result.validation    # "ok", "CPUExecutionProvider", [rows]

Phases (everything is written into a temporary sibling of OUT_DIR, renamed into place at the end):

  load      config.json --(transformers, offline, no remote code)--> nn.Module (+ adapters merged)  model.py
  export    torch.onnx.export(dynamo=True, symbolic batch/sequence) -> model.onnx + model.onnx.data
            (legacy TorchScript exporter only if dynamo fails; the result says which ran and why)  exporters.py
  optimize  model_optimized.onnx + .data (ORT transformer fusions / eager graph / ORT offline opt)  optimize.py
  fp16      fp16 weights, fp32 inputs/outputs                                                       optimize.py
  validate  onnxruntime (CUDA if it really loads, else CPU) vs eager PyTorch, 3 input sets          check.py
  benchmark PyTorch eager vs onnxruntime latency (optional)                                          check.py
  manifest  manifest.json = ExportResult.to_json() ("ok" / "failed" / "not validated")              spec.py

A failed validation still lands the files, with the manifest marked failed, then raises
ValidationError whose `report` is the ExportResult.
"""

from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.core.hf import torch_threads
from surgery.errors import OptionError, ValidationError
from surgery.io import atomic_output_dir, check_output_path, escape_name
from surgery.onnx.check import benchmark_onnx, validate_onnx
from surgery.onnx.decoder import DecoderExport
from surgery.onnx.exporters import export_graph
from surgery.onnx.files import check_symbolic, load_onnx, max_ir_version_supported
from surgery.onnx.generation import export_generation, logits_only_task, with_past
from surgery.onnx.model import Prepared, prepare, prepare_module
from surgery.onnx.optimize import optimize_graph, to_fp16
from surgery.onnx.seq2seq import Seq2SeqExport, export_seq2seq_dir, seq2seq_task
from surgery.onnx.spec import (
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZED_FILE,
    ExportResult,
    InputSpec,
    ValidationReport,
    ValidationRow,
)
from surgery.options.export import SEQ2SEQ_TASKS, ExportOptions

Progress = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------- phases


@dataclass
class _Graphs:
    """What the export, optimize and fp16 phases leave in the temporary directory."""

    files: dict[str, Path]  # "plain" / "optimized" -> graph file
    exporter: str
    exporter_note: str
    optimization: dict[str, Any] | None = None
    io: dict[str, dict[str, list]] = field(default_factory=dict)  # graph_io of the plain file


@dataclass
class _Checks:
    """What the validate and benchmark phases found."""

    report: ValidationReport | None = None
    error: str | None = None  # onnxruntime could not load or run a file
    benchmark: list[dict[str, Any]] = field(default_factory=list)
    quantization: dict[str, Any] | None = None  # the int8 graph's task-level check (quantize.py)

    @property
    def failed(self) -> bool:
        q_failed = self.quantization is not None and not self.quantization["passed"]
        return q_failed or (self.report is not None and (self.error is not None or not self.report.passed))

    @property
    def status(self) -> str:
        return "failed" if self.failed else ("not validated" if self.report is None else "ok")


def _build_graphs(prep: Prepared, tmp: Path, opts: ExportOptions, tick: Callable[[str], None]) -> _Graphs:
    """export -> [optimize] -> [fp16], into `tmp`."""
    scratch = tmp / ".scratch"
    plain = tmp / MODEL_FILE
    exporter, note = export_graph(prep, plain, opts.opset, scratch, opts.exporter)
    tick("export")
    graphs = _Graphs({"plain": plain}, exporter, note)
    if opts.optimize:
        optimized = tmp / OPTIMIZED_FILE
        graphs.optimization = optimize_graph(prep, plain, optimized, opts.opset, scratch, opts.device)
        graphs.files["optimized"] = optimized
        tick("optimize")
    if opts.dtype == "fp16":
        for path in graphs.files.values():
            to_fp16(path)
        tick("fp16")
    # Every file, as it will land, still has the symbolic axes (fp16 rewrites the whole graph).
    ios = {key: check_symbolic(path, prep.spec) for key, path in graphs.files.items()}
    graphs.io = ios["plain"]
    return graphs


def _validate(prep: Prepared, files: Mapping[str, Path], opts: ExportOptions) -> _Checks:
    """Every file against PyTorch; an onnxruntime load/run failure is recorded, not raised."""
    atol, rtol = opts.tolerances()
    rows: list[ValidationRow] = []
    provider, note, error = "", "", None
    for path in files.values():
        try:
            r = validate_onnx(path, prep.wrapper, prep.task, spec=prep.spec, dtype=opts.dtype, atol=atol, rtol=rtol,
                              device=opts.device, threads=opts.threads, raise_on_failure=False)
        except ValidationError as e:  # onnxruntime cannot load/run it: land the files anyway
            error = str(e)
            break
        rows += r.rows
        provider, note = r.provider, r.provider_note
    return _Checks(ValidationReport(rows, provider, note, atol, rtol), error)


def _quantize(prep: Prepared, graphs: _Graphs, tmp: Path, opts: ExportOptions) -> dict[str, Any]:
    """model_int8.onnx from the optimised graph (fusions first) or the plain one; checked at the task level."""
    from surgery.onnx.quantize import INT8_FILE, quantize_int8

    source = graphs.files.get("optimized", graphs.files["plain"])
    info = quantize_int8(prep, source, tmp / INT8_FILE, tmp / ".scratch", opts.threads)
    graphs.files["int8"] = tmp / INT8_FILE  # listed in the manifest, and benchmarked with the others
    return info


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _io_rows(prep: Prepared, gio: Mapping[str, Mapping[str, list]]) -> tuple[list[dict[str, Any]],
                                                                              list[dict[str, Any]]]:
    """The manifest's inputs and outputs: dims as saved in the plain graph, and their dynamic axes."""
    inputs = [{"name": i.name, "dtype": str(i.dtype).replace("torch.", ""), "dims": gio["inputs"].get(i.name),
               "dynamic_axes": {str(a): d for a, d in enumerate(i.shape) if isinstance(d, str)}}
              for i in prep.spec.inputs]
    outputs = [{"name": n, "dims": gio["outputs"].get(n), "dynamic_axes": {str(a): d for a, d in axes.items()}}
               for n, axes in prep.spec.outputs.items()]
    return inputs, outputs


def _result(out_dir: Path, prep: Prepared, opts: ExportOptions, graphs: _Graphs, checks: _Checks) -> ExportResult:
    plain = graphs.files["plain"]
    inputs, outputs = _io_rows(prep, graphs.io)
    atol, rtol = opts.tolerances()
    return ExportResult(
        out_dir=out_dir, status=checks.status, source=prep.source, adapters=[str(a) for a in opts.adapters],
        task=prep.task, model_type=prep.model_type, versions=_versions(), opset=opts.opset,
        ir_version=load_onnx(plain, with_data=False).ir_version,
        max_ir_version_onnxruntime=max_ir_version_supported(), dtype=opts.dtype, exporter=graphs.exporter,
        exporter_note=graphs.exporter_note, files={k: p.name for k, p in graphs.files.items()},
        inputs=inputs, outputs=outputs, optimization=graphs.optimization, atol=atol, rtol=rtol,
        validation_report=checks.report, validation_error=checks.error, benchmark=checks.benchmark,
        pooling=prep.pooling, quantization=checks.quantization,
    )


def _write_manifest(tmp: Path, result: ExportResult, source: str | None = None,
                    opts: ExportOptions | None = None) -> None:
    """manifest.json, and a model card (README.md) that says what the export is and how it validated."""
    (tmp / MANIFEST_FILE).write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    if source is not None and opts is not None:
        from surgery.report.cards import options_dict, write_card

        m = result.to_json()
        summary = {k: m[k] for k in ("status", "task", "dtype", "provider", "provider_note", "exporter") if m.get(k)}
        write_card(tmp, "export-onnx", source, options_dict(opts), summary, tags=["onnx"])


# ----------------------------------------------------------------------------- the command


def _ticker(progress: Progress | None, opts: ExportOptions) -> Callable[[str], None]:
    """progress(stage, step, total) for each phase that runs."""
    total = (2 + int(opts.optimize) + int(opts.quantize is not None) + int(opts.dtype == "fp16")
             + int(opts.validation) + int(opts.benchmark))
    step = 0

    def tick(stage: str) -> None:
        nonlocal step
        step += 1
        if progress:
            progress(stage, step, total)

    return tick


def _load(model_dir: str | Path | None, model: torch.nn.Module | None, inputs: Sequence[InputSpec] | None,
          outputs: Mapping[str, Mapping[int, str]] | None, opts: ExportOptions) -> Prepared:
    if model is not None:
        return prepare_module(model, inputs, outputs, opts)
    if model_dir is None:
        raise OptionError("give a model directory, or model= with inputs= from Python", field="model_dir")
    return prepare(model_dir, opts, outputs)


def _run_checks(prep: Any, graphs: Any, tmp: Path, opts: ExportOptions, tick: Callable[[str], None]) -> _Checks:
    """Phases: validation against PyTorch, then (when it passed) int8 quantisation checked at the
    task level, then the benchmark."""
    checks = _Checks()
    if opts.validation:
        checks = _validate(prep, graphs.files, opts)
        tick("validate")
    if opts.quantize and not checks.failed:
        checks.quantization = _quantize(prep, graphs, tmp, opts)
        tick("quantize")
    if opts.benchmark and not checks.failed:
        checks.benchmark = benchmark_onnx(graphs.files, prep.wrapper, prep.task, spec=prep.spec,
                                          device=opts.device, threads=opts.threads)
        tick("benchmark")
    return checks


def export_onnx(model_dir: str | Path | None, out_dir: str | Path, options: ExportOptions | None = None, *,
                model: torch.nn.Module | None = None, inputs: Sequence[InputSpec] | None = None,
                outputs: Mapping[str, Mapping[int, str]] | None = None, progress: Progress | None = None,
                **fields: Any) -> ExportResult | DecoderExport | Seq2SeqExport:
    """Export a model to OUT_DIR/model.onnx (+ model.onnx.data), validated against PyTorch.

    A causal LM (task "auto" + cache, or "text-generation-with-past") is exported with its KV cache: see
    onnx.generation.export_generation (validated by greedy generation; returns a DecoderExport).
    An encoder-decoder (task "auto" on T5/BART/Marian/Whisper *ForConditionalGeneration, or one of
    SEQ2SEQ_TASKS) is exported in Optimum's encoder_model/decoder_model/decoder_with_past_model layout:
    see onnx.seq2seq.export_seq2seq (validated by greedy generation; returns a Seq2SeqExport).

    Args:
        model_dir: a Hugging Face model directory (None with `model=`).
        out_dir: the output directory (written atomically; refused if it exists unless overwrite).
        options: an ExportOptions; `fields` (its field names, e.g. optimize=True) override it.
        model, inputs, outputs: from Python, any nn.Module with its positional inputs
            (InputSpec list) and outputs ({name: {axis: "batch"}}, default one "output").
        progress: callback(stage, step, total) after each phase.

    Returns:
        The ExportResult (also written as OUT_DIR/manifest.json), the DecoderExport (with past), or the
        Seq2SeqExport (encoder-decoder).

    Raises:
        OptionError: a bad option (naming its field).
        CheckpointError / AdapterError / OutputError: unusable model, adapter or output location.
        SurgeryError: both exporters failed.
        ValidationError: an ONNX output differs from PyTorch beyond atol*scale + rtol*|ref| (or
            onnxruntime cannot run a file). Raised after the files and a manifest with status
            "failed" landed; `e.report` is the ExportResult with every validation row.

    Example:
        res = export_onnx("fixtures/tiny-bert", "out/onnx", optimize=True, device="cpu")
        res.status, [row.max_abs_diff for row in res.validation]
    """
    opts = ExportOptions.build(options, **fields)
    out_dir = Path(out_dir)
    input_paths = [Path(p) for p in ([model_dir] if model_dir is not None else []) + list(opts.adapters)]
    check_output_path(out_dir, opts.overwrite, input_paths)  # refuse before the (slow) model load
    if (model is None or opts.task in SEQ2SEQ_TASKS) and seq2seq_task(model_dir, opts):  # T5/BART/Marian/Whisper
        return export_seq2seq_dir(model_dir, out_dir, opts, model, progress)
    if model is None and with_past(model_dir, opts):  # a causal LM for generation: with its KV cache
        return export_generation(model_dir, out_dir, opts, progress)  # type: ignore[arg-type]
    opts = logits_only_task(opts)
    tick = _ticker(progress, opts)
    with torch_threads(opts.threads):
        prep = _load(model_dir, model, inputs, outputs, opts)
        tick("load")
        with atomic_output_dir(out_dir, overwrite=opts.overwrite, inputs=input_paths) as tmp:
            graphs = _build_graphs(prep, tmp, opts, tick)
            checks = _run_checks(prep, graphs, tmp, opts, tick)
            result = _result(out_dir, prep, opts, graphs, checks)
            _write_manifest(tmp, result, None if model_dir is None else str(model_dir), opts)
            shutil.rmtree(tmp / ".scratch", ignore_errors=True)
    if result.failed:  # after the files landed, for inspection
        raise ValidationError(f"{result.failure_message()}; files left in {escape_name(out_dir)} (manifest status "
                              "'failed')",
                              report=result)
    return result
