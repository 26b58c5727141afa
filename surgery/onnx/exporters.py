"""torch.onnx, both ways: the dynamo exporter first, the legacy TorchScript exporter only when
dynamo fails (raises, or specialises an axis the spec calls dynamic); or the one the `exporter`
option asks for. Either way the result is
one graph file plus one `<name>.data` weight file, at an IR version onnxruntime reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surgery.core.hf import quiet
from surgery.errors import SurgeryError
from surgery.io.guards import escape_name
from surgery.onnx.files import check_symbolic, first_line, load_onnx, patch_header, remove_model, save_onnx
from surgery.onnx.model import Prepared, make_inputs
from surgery.onnx.moe import dense_experts
from surgery.onnx.spec import EXPORT_BATCH, EXPORT_SEQ, IOSpec, data_file

DYNAMO_NOTE = "torch.onnx.export(dynamo=True) with symbolic batch/sequence dims"


def export_args(spec: IOSpec) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Any], ...],
                                       dict[str, dict[int, str]]]:
    """Dummy inputs at 2x7 (one row padded), dynamo Dims per input, legacy dynamic_axes."""
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


def export_dynamo(prep: Prepared, path: Path, opset: int) -> None:
    """torch.onnx.export(dynamo=True) to `path` (+ one .data file)."""
    args, dyn_shapes, _ = export_args(prep.spec)
    with quiet(capture_stdio=True), torch.no_grad():
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
    data = path.with_name(data_file(path.name))
    others = [p for p in path.parent.iterdir() if p not in (path, data) and p.name.startswith(path.stem)]
    if not data.exists() or others:
        proto = load_onnx(path, with_data=True)
        for p in others:
            p.unlink()
        save_onnx(proto, path)
    patch_header(path)


def export_legacy(prep: Prepared, path: Path, opset: int, scratch: Path) -> None:
    """TorchScript exporter into scratch (it may scatter >2 GB weights into many files), then one .data file."""
    args, _, dyn_axes = export_args(prep.spec)
    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / "legacy.onnx"
    with quiet(capture_stdio=True), torch.no_grad():
        torch.onnx.export(
            prep.wrapper, args, str(raw), dynamo=False, opset_version=opset,
            input_names=[i.name for i in prep.spec.inputs], output_names=list(prep.spec.outputs),
            dynamic_axes=dyn_axes, do_constant_folding=True,
        )
    save_onnx(load_onnx(raw, with_data=True), path)


def export_graph(prep: Prepared, path: Path, opset: int, scratch: Path, exporter: str = "auto") -> tuple[str, str]:
    """Export `prep` to `path`, symbolic axes checked: dynamo, else legacy (exporter "auto"), or the one
    asked. Mixture-of-experts blocks trace in moe.dense_experts' form (the note says so); the model is
    unchanged afterwards.

    Args:
        prep, path, opset, scratch: the prepared module, the graph file, the opset, a scratch folder.
        exporter: "auto" (dynamo first, legacy when it fails), "dynamo" or "legacy" (that one only).

    Returns:
        (exporter, note): "dynamo" or "legacy", and why it ran.

    Raises:
        ValidationError: the legacy export (the last one tried) fixed a dynamic axis.
        SurgeryError: every exporter tried failed (the message carries each reason).

    Example:
        export_graph(prep, Path("out/model.onnx"), 18, Path("out/.scratch"), "legacy")  # ("legacy", "...")
    """
    with dense_experts(prep.wrapper) as moe_note:
        used, note = _export_either(prep, path, opset, scratch, exporter)
    return used, (f"{note}; {moe_note}" if moe_note else note)


def _export_either(prep: Prepared, path: Path, opset: int, scratch: Path, exporter: str) -> tuple[str, str]:
    """export_graph's body: (exporter, note)."""
    reason = ""
    if exporter in ("auto", "dynamo"):
        try:
            export_dynamo(prep, path, opset)
            check_symbolic(path, prep.spec)
            return "dynamo", DYNAMO_NOTE if exporter == "auto" else f"exporter 'dynamo' asked: {DYNAMO_NOTE}"
        except Exception as e:  # noqa: BLE001 - any dynamo failure sends us to the fallback, with its reason
            reason = first_line(e)
        remove_model(path)
        if exporter == "dynamo":
            raise SurgeryError(f"ONNX export of {escape_name(prep.source)} failed with the dynamo exporter "
                               f"({reason}); try exporter 'auto'") from None
    try:
        export_legacy(prep, path, opset, scratch)
        check_symbolic(path, prep.spec)
    except SurgeryError:
        raise
    except Exception as e2:  # noqa: BLE001
        first = f"dynamo ({reason}); " if reason else ""
        raise SurgeryError(f"ONNX export of {escape_name(prep.source)} failed: {first}legacy ({first_line(e2)}); "
                           "try another opset or report the model type") from None
    if exporter == "legacy":
        return "legacy", "exporter 'legacy' asked: the legacy TorchScript exporter"
    return "legacy", f"dynamo export failed ({reason}); used the legacy TorchScript exporter"
