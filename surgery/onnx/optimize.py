"""The optimised variant (model_optimized.onnx) and fp16 weights.

Why the optimised variant is exported with the legacy exporter (measured on onnxruntime 1.31.1,
torch 2.13): onnxruntime.transformers' fusions match the TorchScript exporter's patterns. On a
dynamo graph of BERT/MiniLM the Attention and EmbedLayerNormalization fusions never fire (only
SkipLayerNorm/BiasGelu do), and the GPT-2 fusion pass crashes (IndexError in onnx_model_gpt2
postprocess). On the legacy graph of the same model (eager attention) 6 Attention +
1 EmbedLayerNormalization fuse for MiniLM. So the CUDA target re-exports with the legacy exporter
for fusion, and every target falls back to onnxruntime's offline graph optimisation of the dynamo
graph when the model type has no fusion pass (Llama) or when legacy export / fusion fails.

CPU target: the fused Attention op was slower than plain MatMul/Softmax (MiniLM 8x128, 2 threads:
131 vs 116 ms; 1x128 17 vs 16 ms), so the CPU variant is the eager-attention (legacy-exported)
graph, saved as exported: onnxruntime's load-time optimisations (ORT_ENABLE_ALL) do better on it
than on a graph saved after offline optimisation (16 vs 45 ms at 1x128).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surgery.core.hf import quiet
from surgery.errors import SurgeryError
from surgery.onnx.check import make_session
from surgery.onnx.exporters import export_legacy
from surgery.onnx.files import check_symbolic, first_line, load_onnx, ort, patch_header, remove_model, save_onnx
from surgery.onnx.model import Prepared
from surgery.onnx.spec import data_file

# model_type (config.json) -> onnxruntime.transformers.optimizer model_type with fusion passes.
FUSION_MODEL_TYPES = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert",
    "albert": "bert", "electra": "bert", "camembert": "bert", "mpnet": "bert",
    "gpt2": "gpt2", "gpt_neox": "gpt_neox", "phi": "phi",
}

CPU_METHOD = "eager-attention graph for CPU (onnxruntime optimises it at load, ORT_ENABLE_ALL)"
OFFLINE_METHOD = "onnxruntime offline graph optimisation (ORT_ENABLE_EXTENDED, CPU)"
LEGACY_SOURCE = "legacy exporter, eager attention"
CPU_ATTEMPT = "CPU optimisation of the eager-attention graph"


def _cuda_target(device: str) -> bool:
    """Will the optimised graph run on CUDA? (The provider must exist and torch see a GPU.)"""
    if device == "cpu":
        return False
    return "CUDAExecutionProvider" in ort().get_available_providers() and torch.cuda.is_available()


def _info(method: str, source: str, notes: list[str], fused: dict[str, int] | None = None) -> dict[str, Any]:
    return {"method": method, "graph_source": source, "fused_ops": fused or {}, "notes": notes}


def _attempt(out: Path, notes: list[str], rejected: str, failed: str, fn: Any) -> dict[str, Any] | None:
    """Run one way of making the optimised graph; on failure note why, clear `out`, return None.

    `rejected` names a result our checks refused, `failed` an attempt that raised."""
    try:
        return fn()
    except SurgeryError as e:
        notes.append(f"{rejected} rejected: {e}")
    except Exception as e:  # noqa: BLE001 - the fusion passes crash on graphs they don't expect
        notes.append(f"{failed} failed ({first_line(e)})")
    remove_model(out)
    return None


def _eager_cpu(prep: Prepared, out: Path, opset: int, scratch: Path, notes: list[str]) -> dict[str, Any]:
    export_legacy(prep, out, opset, scratch / "legacy_cpu")
    check_symbolic(out, prep.spec)
    return _info(CPU_METHOD, LEGACY_SOURCE, notes)


def _fused(prep: Prepared, out: Path, opset: int, scratch: Path, model_type: str,
           notes: list[str]) -> dict[str, Any]:
    from onnxruntime.transformers.optimizer import optimize_model

    # Fusion patterns match the TorchScript exporter's graph (see the module docstring).
    src = scratch / "for_fusion.onnx"
    export_legacy(prep, src, opset, scratch / "legacy_fusion")
    cfg = prep.config
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 0)
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 0)
    with quiet(capture_stdio=True):
        om = optimize_model(str(src), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=1)
    stats = {k: int(v) for k, v in om.get_fused_operator_statistics().items() if v}
    save_onnx(om.model, out)
    check_symbolic(out, prep.spec)
    make_session(out, "cpu")  # fusion passes can emit graphs onnxruntime rejects (GPT-2 at opset 18)
    return _info(f"onnxruntime.transformers.optimizer (model_type={model_type}, opt_level=1)", LEGACY_SOURCE,
                 notes, stats)


def ort_offline(src: Path, out: Path) -> None:
    """onnxruntime's own graph optimisations of `src`, saved to `out` (weights as external data)."""
    rt = ort()
    so = rt.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_file(out.name))
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    rt.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    patch_header(out)


def optimize_graph(prep: Prepared, plain: Path, out: Path, opset: int, scratch: Path,
                   device: str = "auto") -> dict[str, Any]:
    """Write the optimised variant of `plain` to `out`, for the device it will run on.

    CUDA: onnxruntime's transformer fusions (its fused Attention kernel is what makes GPUs
    fast). CPU: the eager-attention graph. Either falls back to onnxruntime's offline
    optimisation of the plain export (see the module docstring).

    Returns:
        How it was made: {"method", "graph_source", "fused_ops", "notes"} (the manifest's "optimization").

    Raises:
        ValidationError: the fallback's graph lost a symbolic axis.
    """
    notes: list[str] = []
    model_type = FUSION_MODEL_TYPES.get(prep.model_type or "")
    if model_type is not None and not _cuda_target(device):
        info = _attempt(out, notes, CPU_ATTEMPT, CPU_ATTEMPT,
                        lambda: _eager_cpu(prep, out, opset, scratch, notes))
        if info is not None:
            return info
        model_type = None  # fall back to optimising the plain export
        notes.append("optimised the plain export instead")
    elif model_type is not None:
        info = _attempt(out, notes, "fusion result", "transformer fusion",
                        lambda: _fused(prep, out, opset, scratch, model_type, notes))
        if info is not None:
            return info
    else:
        notes.append(f"no onnxruntime fusion pass for model_type {prep.model_type!r}")
    ort_offline(plain, out)
    check_symbolic(out, prep.spec)
    return _info(OFFLINE_METHOD, "plain export", notes)


def to_fp16(path: Path) -> None:
    """Rewrite the model at `path` with fp16 weights and compute, fp32 graph inputs/outputs
    (Cast nodes at the boundary)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = load_onnx(path, with_data=True)
    big = proto.ByteSize() > 2**31 - 1  # shape inference serialises the model: not past 2 GB
    with quiet(capture_stdio=True):
        proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=big)
    save_onnx(proto, path)
