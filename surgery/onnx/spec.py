"""The vocabulary the exporter and the checks share: input/output specs, validation rows and
reports, the export's result (whose JSON is manifest.json), file names and fixed sizes.

Imports nothing from the rest of surgery.onnx, so export.py and check.py can both use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.options.export import (  # noqa: F401 - re-exported: the one definition lives with the options
    CUSTOM_TASK,
    DEFAULT_OPSET,
    MIN_OPSET,
    ONNX_DTYPES,
    TASKS,
    TOLERANCES,
)

# Dummy sizes for export: >= 2 and batch != sequence so the tracer specialises neither
# (torch.export specialises sizes 0 and 1, and equal sizes can be unified into one symbol).
EXPORT_BATCH, EXPORT_SEQ = 2, 7

MODEL_FILE = "model.onnx"
OPTIMIZED_FILE = "model_optimized.onnx"
MANIFEST_FILE = "manifest.json"
#: the tolerance rule, as recorded in the manifest
TOLERANCE_RULE = ("|onnx - torch| <= atol*scale + rtol*|torch| (scale: max |torch| of the output), "
                  "non-padding positions")


def data_file(name: str) -> str:
    """The external weight file saved beside graph file `name`."""
    return name + ".data"


# ----------------------------------------------------------------------------- inputs and outputs


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


# ----------------------------------------------------------------------------- validation


@dataclass
class ValidationRow:
    """Comparison of one output on one input set (and one ONNX file)."""

    file: str
    input_set: str
    output: str
    shape: list[int]
    max_abs_diff: float
    max_rel_diff: float  # over elements with |ref| > atol*scale (relative error is noise near zero)
    mean_abs_diff: float
    tol_ratio: float  # max |diff| / (atol*scale + rtol*|ref|); <= 1 passes
    passed: bool
    top1_agreement: float | None = None  # causal LMs: argmax agreement on non-padding positions
    scale: float | None = None  # max |ref| of the output: atol is relative to it

    def to_json(self) -> dict[str, Any]:
        """The row as strict JSON: inf/nan (shape mismatch, non-finite output) become strings."""
        row = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}


@dataclass
class ValidationReport:
    """Every row of one validation run, on the provider that really ran."""

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
        """One line naming the worst row, or "" when everything passed."""
        w = self.worst
        if w is None or w.passed:
            return ""
        return (
            f"ONNX output '{w.output}' of {w.file} differs from PyTorch on input set '{w.input_set}': "
            f"max abs diff {w.max_abs_diff:.3g} exceeds atol {self.atol:g}·scale {w.scale or 0:.3g} + rtol "
            f"{self.rtol:g}·|ref| "
            f"({w.tol_ratio:.3g}× the tolerance, on {self.provider})"
        )


# ----------------------------------------------------------------------------- the export's result


@dataclass
class ExportResult:
    """What `export_onnx` produced; `to_json()` is the content of manifest.json.

    `files` maps a variant ("plain", "optimized") to its graph file name in `out_dir`;
    `inputs` / `outputs` are the manifest's rows (name, dims as saved, dynamic axes).
    `validation_report` is None when validation was skipped; `validation_error` is set when
    onnxruntime could not load or run a file at all."""

    out_dir: Path
    status: str  # "ok" | "failed" | "not validated"
    source: str
    adapters: list[str]
    task: str
    model_type: str | None
    versions: dict[str, str]
    opset: int
    ir_version: int
    max_ir_version_onnxruntime: int
    dtype: str
    exporter: str  # "dynamo" | "legacy"
    exporter_note: str
    files: dict[str, str]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    optimization: dict[str, Any] | None
    atol: float
    rtol: float
    validation_report: ValidationReport | None = None
    validation_error: str | None = None
    benchmark: list[dict[str, Any]] = field(default_factory=list)
    pooling: dict[str, Any] | None = None  # sentence-transformers pooling built into the graph
    quantization: dict[str, Any] | None = None  # the int8 graph's task-level check

    # -- paths
    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL_FILE

    @property
    def data_path(self) -> Path:
        return self.out_dir / data_file(MODEL_FILE)

    @property
    def optimized_path(self) -> Path | None:
        return self.out_dir / self.files["optimized"] if "optimized" in self.files else None

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_FILE

    # -- validation
    @property
    def validation(self) -> list[ValidationRow]:
        return self.validation_report.rows if self.validation_report else []

    @property
    def provider(self) -> str | None:
        return (self.validation_report.provider or None) if self.validation_report else None

    @property
    def provider_note(self) -> str:
        return self.validation_report.provider_note if self.validation_report else ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def failure_message(self) -> str:
        """Why validation failed (onnxruntime's error, or the worst row), or ""."""
        if not self.failed:
            return ""
        q = self.quantization
        if q is not None and not q.get("passed", True) and (self.validation_report is None
                                                             or self.validation_report.passed):
            bad = next(r for r in q["rows"] if not r["passed"])
            return (f"int8 output '{bad['output']}' of {q['file']} misses the task-level thresholds on input set "
                    f"'{bad['input_set']}' (min cosine {bad['min_cosine']}, top-1 {bad.get('top1_agreement')}; "
                    f"need {q['thresholds']['min_cosine']} / {q['thresholds']['top1_agreement']})")
        return self.validation_error or (self.validation_report.failure_message() if self.validation_report else "")

    # -- manifest
    @property
    def manifest(self) -> dict[str, Any]:
        return self.to_json()

    def to_json(self) -> dict[str, Any]:
        """The manifest: every field, JSON-safe, in a stable key order."""
        report = self.validation_report
        return {
            "status": self.status,
            "source": self.source,
            "adapters": list(self.adapters),
            "task": self.task,
            "model_type": self.model_type,
            "versions": dict(self.versions),
            "opset": self.opset,
            "ir_version": self.ir_version,
            "max_ir_version_onnxruntime": self.max_ir_version_onnxruntime,
            "dtype": self.dtype,
            "io_dtypes": "fp32 inputs/outputs" if self.dtype == "fp16" else "as exported",
            "exporter": self.exporter,
            "exporter_note": self.exporter_note,
            "export_shapes": {"batch": EXPORT_BATCH, "sequence": EXPORT_SEQ},
            "files": {k: {"model": name, "data": data_file(name)} for k, name in self.files.items()},
            "inputs": self.inputs,
            "outputs": self.outputs,
            "optimization": self.optimization,
            "tolerances": {"atol": self.atol, "rtol": self.rtol, "rule": TOLERANCE_RULE},
            "validation": None if report is None else {
                "execution_provider": report.provider,
                "provider_note": report.provider_note,
                "passed": not self.failed,
                "error": self.validation_error,
                "rows": [r.to_json() for r in report.rows],
            },
            "benchmark": self.benchmark or None,
            "pooling": self.pooling,
            "quantization": self.quantization,
        }
