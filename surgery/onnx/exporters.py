"""torch.onnx, both ways. exporter "auto": the legacy TorchScript exporter first (several times
faster than dynamo on small models, and the graph Optimum ships), its graph checked: symbolic axes
(check_symbolic) and onnxruntime against PyTorch at batch/sequence sizes other than the export's
(check_export, catching a size the trace baked in); when any step fails, torch.onnx.export(dynamo=True)
(decoder.EXPORTER_ORDER, as for the with-past graph). "dynamo"/"legacy" run that one only. Either way
the result is one graph file plus one `<name>.data` weight file, at an IR version onnxruntime reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surgery.core.hf import quiet
from surgery.errors import SurgeryError
from surgery.io.guards import escape_name
from surgery.onnx.check import validate_onnx
from surgery.onnx.decoder import EXPORTER_ORDER
from surgery.onnx.files import check_symbolic, first_line, load_onnx, patch_header, remove_model, save_onnx
from surgery.onnx.model import Prepared, default_input_sets, make_inputs
from surgery.onnx.moe import dense_experts
from surgery.onnx.spec import EXPORT_BATCH, EXPORT_SEQ, IOSpec, data_file

DYNAMO_NOTE = "torch.onnx.export(dynamo=True) with symbolic batch/sequence dims"
LEGACY_NOTE = "the legacy TorchScript exporter"
#: default_input_sets the auto legacy graph must pass before it is kept: batch 1 (a batch of 2 baked in
#: broadcasts wrongly or fails) and a padded 4x11 (the mask path), both unlike the export's 2x7
GATE_SETS = ("b1_s5", "b4_s11_padded")


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


def check_export(prep: Prepared, path: Path) -> None:
    """Run the saved graph on onnxruntime (CPU) at GATE_SETS and compare every output with prep.wrapper.

    The gate of an auto legacy export: a TorchScript trace records Python ints, so a graph can load and
    have symbolic axes yet compute with a size of the export's 2x7. Tolerances: fp32 (the export runs
    in fp32; fp16 conversion comes later and has its own validation).

    Args:
        prep: the prepared module the graph was exported from. path: the saved graph.

    Raises:
        ValidationError: onnxruntime cannot load or run the graph, or an output differs (named).

    Example:
        check_export(prep, Path("out/model.onnx"))
    """
    sets = default_input_sets(prep.spec)
    validate_onnx(path, prep.wrapper, prep.task, spec=prep.spec, input_sets={k: sets[k] for k in GATE_SETS},
                  device="cpu")


def export_graph(prep: Prepared, path: Path, opset: int, scratch: Path, exporter: str = "auto") -> tuple[str, str]:
    """Export `prep` to `path`, symbolic axes checked: legacy, checked by check_export, else dynamo
    (exporter "auto"), or the one asked. Mixture-of-experts blocks trace in moe.dense_experts' form
    (the note says so); the model is unchanged afterwards.

    Args:
        prep, path, opset, scratch: the prepared module, the graph file, the opset, a scratch folder.
        exporter: "auto" (legacy first, dynamo when it fails), "dynamo" or "legacy" (that one only).

    Returns:
        (exporter, note): "dynamo" or "legacy", and why it ran (in auto, why legacy was refused).

    Raises:
        ValidationError: the legacy export, asked, fixed a dynamic axis.
        SurgeryError: every exporter tried failed (the message carries each reason).

    Example:
        export_graph(prep, Path("out/model.onnx"), 18, Path("out/.scratch"), "legacy")  # ("legacy", "...")
    """
    with dense_experts(prep.wrapper) as moe_note:
        used, note = _export_either(prep, path, opset, scratch, exporter)
    return used, (f"{note}; {moe_note}" if moe_note else note)


def _export_one(name: str, prep: Prepared, path: Path, opset: int, scratch: Path, gate: bool) -> None:
    """One exporter to `path`, its axes checked, and with `gate` its numbers (check_export)."""
    if name == "dynamo":
        export_dynamo(prep, path, opset)
    else:
        export_legacy(prep, path, opset, scratch)
    check_symbolic(path, prep.spec)
    if gate:
        check_export(prep, path)


def _note(name: str, exporter: str, failed: list[str]) -> str:
    what = DYNAMO_NOTE if name == "dynamo" else LEGACY_NOTE
    if exporter != "auto":
        return f"exporter {exporter!r} asked: {what}"
    if failed:
        return f"auto: {'; '.join(failed)}; used {what}"
    return (f"auto: {what} (its graph matched PyTorch at batch/sequence sizes other than the export's), "
            "symbolic batch/sequence dims")


def _export_either(prep: Prepared, path: Path, opset: int, scratch: Path, exporter: str) -> tuple[str, str]:
    """export_graph's body: the exporters of EXPORTER_ORDER[exporter] in turn; (exporter, note)."""
    order = EXPORTER_ORDER[exporter]
    failed: list[str] = []
    for i, name in enumerate(order):
        try:
            _export_one(name, prep, path, opset, scratch, gate=i < len(order) - 1)
            return name, _note(name, exporter, failed)
        except Exception as e:  # noqa: BLE001 - any failure of one exporter sends us to the next, with its reason
            if exporter == "legacy" and isinstance(e, SurgeryError):  # asked, our own check refused it: as it is
                raise
            reason = first_line(e)
        remove_model(path)
        failed.append(f"{name} export failed ({reason})")
    src = escape_name(prep.source)
    if exporter == "dynamo":
        raise SurgeryError(f"ONNX export of {src} failed with the dynamo exporter ({reason}); try exporter 'auto'")
    raise SurgeryError(f"ONNX export of {src} failed: {'; '.join(failed)}; try another opset or report the model type")
