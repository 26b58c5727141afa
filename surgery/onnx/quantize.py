"""int8 for the CPU: onnxruntime dynamic quantisation of an exported graph, checked at the task
level (an int8 graph never matches PyTorch to 1e-4, so it is judged by what it is used for).

    info = quantize_int8(prep, Path("out/model.onnx"), Path("out/model_int8.onnx"), scratch)
    info["passed"], info["metrics"]   # cosine / top-1 agreement per output, thresholds beside them

Per output (only sentence_embedding when pooling is built in; the token embeddings are then
reported, not gated): the cosine similarity of each row (each non-padding token for per-token outputs)
with PyTorch's, worst row >= COSINE_MIN; for logits also the argmax agreement >= TOP1_MIN.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.onnx.files import load_onnx, save_onnx
from surgery.onnx.model import Prepared, default_input_sets

INT8_FILE = "model_int8.onnx"
#: task-level thresholds, recorded in the manifest
COSINE_MIN = 0.99
TOP1_MIN = 0.9
METHOD = ("onnxruntime.quantization.quantize_dynamic (MatMul only: QInt8 per-channel weights, uint8 activations; "
          "embeddings and FFN down-projections stay fp32)")
# Quantising the embedding Gathers too (the default op list) costs all-MiniLM-L6-v2 its cosine:
# 0.984 on real sentences vs 0.992 with MatMul only (per-tensor weights: 0.958). The FFN
# down-projections (weight K > N: they contract the wide intermediate, whose post-GELU
# activations have outliers that per-tensor uint8 activations clip) stay fp32: worst cosine on
# random tokens 0.988 -> 0.995, real sentences 0.992 -> 0.996.
OP_TYPES = ["MatMul"]


def wide_input_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose constant weight (K, N) has K > N (FFN down-projections).

    Example: len(wide_input_matmuls(Path("minilm/model.onnx"))) == 6   # one per layer"""
    proto = load_onnx(path, with_data=False)
    dims = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and len(n.input) > 1
            and len(dims.get(n.input[1], ())) == 2 and dims[n.input[1]][0] > dims[n.input[1]][1]]


def _rows(ref: np.ndarray, got: np.ndarray, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Both outputs as (rows, features): per sample, or per real token for (batch, seq, ...) outputs."""
    if keep is not None:
        return ref[keep].reshape(int(keep.sum()), -1), got[keep].reshape(int(keep.sum()), -1)
    if ref.ndim >= 3:
        return ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    return ref.reshape(ref.shape[0], -1), got.reshape(got.shape[0], -1)


def task_metrics(name: str, ref: np.ndarray, got: np.ndarray, keep: np.ndarray | None) -> dict[str, Any]:
    """{"min_cosine", "top1_agreement" (logits only), "passed"} for one output on one input set.

    Example: task_metrics("logits", r, r, None) == {"min_cosine": 1.0, "top1_agreement": 1.0, "passed": True}"""
    if ref.shape != got.shape:
        return {"min_cosine": None, "top1_agreement": None, "passed": False, "error": f"shape {got.shape}"}
    r, g = _rows(ref.astype(np.float64), got.astype(np.float64), keep)
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    cos = np.where(denom > 0, (r * g).sum(1) / np.maximum(denom, 1e-30), 1.0)
    out: dict[str, Any] = {"min_cosine": round(float(cos.min()), 6) if cos.size else 1.0}
    ok = bool(np.isfinite(g).all()) and out["min_cosine"] >= COSINE_MIN
    if "logits" in name and r.shape[1] > 1:
        out["top1_agreement"] = round(float((r.argmax(1) == g.argmax(1)).mean()), 6)
        ok = ok and out["top1_agreement"] >= TOP1_MIN
    out["passed"] = ok
    return out


def _keep(inputs: Mapping[str, torch.Tensor], axes: Mapping[int, str], ref: np.ndarray) -> np.ndarray | None:
    mask = inputs.get("attention_mask")
    if mask is None or axes.get(1) != "sequence" or ref.ndim < 3 or tuple(mask.shape) != ref.shape[:2]:
        return None
    return mask.numpy().astype(bool)


def check_quantized(prep: Prepared, path: Path, threads: int | None = None) -> list[dict[str, Any]]:
    """Task-level rows of an int8 graph against the fp32 PyTorch model on the default input sets (CPU)."""
    from surgery.onnx.check import make_session

    sess, _, _ = make_session(path, "cpu", threads)
    names = {i.name for i in sess.get_inputs()}
    rows = []
    for set_name, inputs in default_input_sets(prep.spec).items():
        with torch.no_grad():
            refs = prep.wrapper(*(inputs[i.name] for i in prep.spec.inputs))
        got = sess.run(list(prep.spec.outputs), {k: v.numpy() for k, v in inputs.items() if k in names})
        for (name, axes), ref, g in zip(prep.spec.outputs.items(), refs, got, strict=False):
            ref_np = ref.detach().float().numpy()
            row = {"input_set": set_name, "output": name,
                   **task_metrics(name, ref_np, np.asarray(g, np.float32), _keep(inputs, axes, ref_np))}
            if prep.pooling and name != "sentence_embedding":  # the sentence embedding is what is used
                row["gated"], row["passed"] = False, True
            rows.append(row)
    return rows


def quantize_int8(prep: Prepared, source: Path, out: Path, scratch: Path, threads: int | None = None) -> dict[str, Any]:
    """Write `out` (+ .data): `source` dynamically quantised to int8, then checked at the task level.

    Args:
        prep: the prepared model (the fp32 PyTorch reference and its I/O).
        source: the fp32 graph to quantise (the optimised one when there is one: fusions first).
        out: the int8 graph file.
        scratch: a directory for onnxruntime's intermediate file.
        threads: onnxruntime threads for the check.

    Returns:
        The manifest's "quantization" entry: method, source, thresholds, rows, passed.

    Example:
        quantize_int8(prep, tmp / "model.onnx", tmp / "model_int8.onnx", tmp / ".scratch")["passed"]
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from surgery.core.hf import quiet

    scratch.mkdir(parents=True, exist_ok=True)
    raw = scratch / "int8.onnx"
    with quiet(capture_stdio=True):
        quantize_dynamic(str(source), str(raw), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=OP_TYPES,
                         nodes_to_exclude=wide_input_matmuls(source),
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    save_onnx(load_onnx(raw, with_data=True), out)
    rows = check_quantized(prep, out, threads)
    return {"method": METHOD, "source": source.name, "file": out.name,
            "thresholds": {"min_cosine": COSINE_MIN, "top1_agreement": TOP1_MIN,
                           "rule": "per row (per real token for per-token outputs), every input set"},
            "rows": rows, "passed": all(r["passed"] for r in rows)}
