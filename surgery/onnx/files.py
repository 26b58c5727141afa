"""ONNX files as onnxruntime will read them: the IR version it accepts, weights in exactly one
external `<name>.data` file, and the graph's inputs/outputs (symbolic axes checked).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from surgery.errors import ValidationError
from surgery.io.guards import escape_name
from surgery.onnx.spec import IOSpec, data_file


def ort() -> Any:
    """onnxruntime, imported with its logger kept to fatal messages.

    onnxruntime-gpu logs an error to stderr when CUDA is listed but cannot load; we report
    the provider that ran ourselves."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)
    return onnxruntime


def first_line(e: BaseException) -> str:
    """One-line reason; torch.onnx wraps the real error (its own first line is boilerplate)."""
    if e.__cause__ is not None and type(e).__name__ in ("TorchExportError", "ConversionError"):
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {escape_name(text[0], 200) if text else ''}"


# ----------------------------------------------------------------------------- IR version


@functools.cache
def max_ir_version_supported() -> int:
    """Highest ONNX IR version the installed onnxruntime loads, found by trying.

    onnxruntime has no public API for this and its release notes are the only table
    (1.31.1: IR 13, while onnx 1.23 writes IR 14), so we build a one-node Identity model
    at decreasing IR versions and keep the first one an InferenceSession accepts.

    Returns:
        The IR version (7 when none loads: every onnxruntime we can run on reads IR 7).
    """
    import onnx
    from onnx import TensorProto, helper

    rt = ort()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    so = rt.SessionOptions()
    so.log_severity_level = 4
    for ir in range(onnx.IR_VERSION, 6, -1):
        probe.ir_version = ir
        try:
            rt.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # noqa: BLE001 - any load failure means "not this version"
            continue
    return 7


def clamp_ir_version(model_proto: Any) -> int:
    """Lower model_proto.ir_version to what the installed onnxruntime reads; returns the new value.

    Example: clamp_ir_version(onnx.load("model.onnx", load_external_data=False)) -> 13"""
    model_proto.ir_version = min(model_proto.ir_version, max_ir_version_supported())
    return int(model_proto.ir_version)


# ----------------------------------------------------------------------------- load / save


def load_onnx(path: Path, with_data: bool) -> Any:
    """The ModelProto at `path`, with its external weights or only the graph."""
    import onnx

    return onnx.load(str(path), load_external_data=with_data)


def save_onnx(model_proto: Any, path: Path) -> None:
    """Save with all weights in one external file `<name>.data` beside it (works past 2 GB).

    The IR version is clamped to what onnxruntime reads. Callers hold every tensor in memory
    (loaded with external data) when they re-save."""
    import onnx

    path = Path(path)
    data = path.with_name(data_file(path.name))
    # onnx appends to an existing external-data file, so a stale one would corrupt offsets.
    if data.exists():
        data.unlink()
    clamp_ir_version(model_proto)
    # Tensors under 1 KiB stay inline: onnxruntime's shape inference reads small constants
    # (Unsqueeze/Reshape axes) at load time and cannot take them from external data.
    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024, convert_attribute=False)
    if data.exists():
        data.chmod(0o644)  # onnx creates it 0600; a model file is meant to be shared


def patch_header(path: Path) -> None:
    """Clamp the IR version of a saved model by rewriting only its graph file (data untouched)."""
    import onnx

    proto = load_onnx(path, with_data=False)
    old = proto.ir_version
    if clamp_ir_version(proto) != old:
        onnx.save_model(proto, str(path))  # external tensors keep their location/offset entries


def remove_model(path: Path) -> None:
    """Delete a graph file and every file named after it (its .data), e.g. after a failed attempt."""
    for p in path.parent.glob(path.name + "*"):
        p.unlink()


# ----------------------------------------------------------------------------- graph inputs / outputs


def _dims(value_info: Any) -> list[str | int | None]:
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
    """{"inputs": {name: dims}, "outputs": {name: dims}}, dims as saved (str = symbolic).

    Example: graph_io(Path("out/model.onnx"))["inputs"]["input_ids"] == ["batch", "sequence"]"""
    proto = load_onnx(path, with_data=False)
    inits = {i.name for i in proto.graph.initializer}
    return {
        "inputs": {v.name: _dims(v) for v in proto.graph.input if v.name not in inits},
        "outputs": {v.name: _dims(v) for v in proto.graph.output},
    }


def check_symbolic(path: Path, spec: IOSpec) -> dict[str, dict[str, list]]:
    """Check that every axis the spec calls dynamic is a dim_param in the saved graph.

    Args:
        path: the graph file.
        spec: inputs/outputs with their symbolic axes.

    Returns:
        graph_io(path).

    Raises:
        ValidationError: an input/output is missing or one of its dynamic axes was fixed.
    """
    gio = graph_io(path)
    wanted: list[tuple[str, str, dict[int, str]]] = [
        ("input", i.name, {a: d for a, d in enumerate(i.shape) if isinstance(d, str)}) for i in spec.inputs
    ] + [("output", name, axes) for name, axes in spec.outputs.items()]
    for kind, name, axes in wanted:
        dims = gio[kind + "s"].get(name)
        if dims is None:
            raise ValidationError(f"{escape_name(path.name)} has no graph {kind} named '{escape_name(name)}'; the "
                                  "export lost it")
        for axis, dim_name in axes.items():
            if axis >= len(dims) or not isinstance(dims[axis], str):
                got = dims[axis] if axis < len(dims) else "missing"
                raise ValidationError(
                    f"{escape_name(path.name)}: {kind} '{escape_name(name)}' axis {axis} ({dim_name}) is fixed to "
                    f"{got}, not symbolic; the export specialised it (a shape-dependent branch in the model?)"
                )
    return gio
