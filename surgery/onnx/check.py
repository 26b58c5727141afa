"""onnxruntime sessions, validation against PyTorch, and latency benchmarks.

Split from export_onnx.py: the exporter produces files, this module checks them. A
session runs on CUDA only when the provider really loads (read back with
get_providers(); onnxruntime-gpu lists CUDA even where it cannot load it).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from surgery.errors import CheckpointError, OptionError, ValidationError
from surgery.onnx.export import (
    DEVICES,
    DTYPES,
    TOLERANCES,
    IOSpec,
    ValidationReport,
    ValidationRow,
    _first_line,
    _hf_spec,
    _ort,
    _Wrapped,
    default_input_sets,
    make_inputs,
)


# ----------------------------------------------------------------------------- sessions


def make_session(path: str | Path, device: str = "auto", threads: int | None = None):
    """InferenceSession on CUDA when asked/auto and it really loads, else CPU: (session, provider, note)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    note = ""
    providers = ["CPUExecutionProvider"]
    if device in ("auto", "cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            note = "CUDA unavailable (onnxruntime built without CUDAExecutionProvider): validated on CPU"
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001
        raise ValidationError(f"onnxruntime cannot load {Path(path).name} ({_first_line(e)}); "
                              f"try a lower --opset") from None
    used = sess.get_providers()[0]
    if providers[0] == "CUDAExecutionProvider" and used != "CUDAExecutionProvider":
        note = "CUDA unavailable: validated on CPU"  # onnxruntime-gpu lists CUDA even when it can't load it
    elif device == "cpu":
        note = "CPU requested"
    elif used == "CUDAExecutionProvider":
        note = "validated on CUDA"
    return sess, used, note


# ----------------------------------------------------------------------------- validation


def _non_padding(inputs: Mapping[str, torch.Tensor], ref: np.ndarray, axes: Mapping[int, str]) -> np.ndarray | None:
    """Boolean (batch, seq) mask of real tokens when the output has batch and sequence axes."""
    mask = inputs.get("attention_mask")
    if mask is None or axes.get(0) != "batch" or axes.get(1) != "sequence" or ref.ndim < 2:
        return None
    m = mask.numpy().astype(bool)
    return m if m.shape == ref.shape[:2] else None


def _compare(file: str, set_name: str, name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float,
             keep: np.ndarray | None, causal: bool) -> ValidationRow:
    if got.shape != ref.shape:
        inf = float("inf")
        return ValidationRow(file, set_name, name, list(got.shape), inf, inf, inf, inf, False)
    r = ref[keep] if keep is not None else ref  # padding positions are don't-care
    g = got[keep] if keep is not None else got
    r = r.astype(np.float64)
    g = g.astype(np.float64)
    diff = np.abs(g - r)
    finite = bool(np.isfinite(g).all())
    big = np.abs(r) > atol
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff[big] / np.abs(r[big])).max()) if big.any() else 0.0
    denom = atol + rtol * np.abs(r)
    # atol = rtol = 0 demands exact equality: any difference is an infinite overshoot.
    over = np.divide(diff, denom, out=np.where(diff > 0, np.inf, 0.0), where=denom > 0)
    ratio = float(over.max()) if diff.size else 0.0
    if not finite:
        max_abs = ratio = float("inf")
    top1 = None
    if causal and r.ndim >= 2:
        top1 = float((g.argmax(-1) == r.argmax(-1)).mean())
    return ValidationRow(file, set_name, name, list(ref.shape), max_abs, max_rel,
                         float(diff.mean()) if diff.size else 0.0, ratio, finite and ratio <= 1.0, top1)


def _wrap(torch_model: torch.nn.Module, task: str, spec: IOSpec | None) -> tuple[_Wrapped, IOSpec]:
    """A transformers model (spec from its config and task) or a module with an explicit spec → wrapper."""
    if isinstance(torch_model, _Wrapped):
        if spec is None:
            raise OptionError("a wrapped module needs spec=")
        return torch_model, spec
    config = getattr(torch_model, "config", None)
    if config is None:
        if spec is None:
            raise OptionError("a plain nn.Module needs spec=IOSpec(...) describing its inputs and outputs")
        return _Wrapped(torch_model, [i.name for i in spec.inputs], list(spec.outputs), hf=False), spec
    hf_spec, extra = _hf_spec(torch_model, config, task)
    spec = spec or hf_spec
    return _Wrapped(torch_model, [i.name for i in spec.inputs], list(spec.outputs), hf=True, extra=extra), spec


def validate_onnx(onnx_path: str | Path, torch_model: torch.nn.Module, task: str = "feature-extraction", *,
                  spec: IOSpec | None = None, input_sets: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                  dtype: str = "fp32", atol: float | None = None, rtol: float | None = None, device: str = "auto",
                  raise_on_failure: bool = True) -> ValidationReport:
    """Run onnx_path on onnxruntime and compare each output with eager PyTorch.

    torch_model is a transformers model (its inputs/outputs derive from config and task) or any
    nn.Module with `spec` giving its inputs/outputs. Raises ValidationError on a difference above
    atol + rtol·|ref| unless raise_on_failure=False; the report always carries every row.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CheckpointError(f"{onnx_path} does not exist; export the model first")
    if dtype not in DTYPES:
        raise OptionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if device not in DEVICES:
        raise OptionError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    atol = TOLERANCES[dtype]["atol"] if atol is None else float(atol)
    rtol = TOLERANCES[dtype]["rtol"] if rtol is None else float(rtol)
    wrapper, spec = _wrap(torch_model, task, spec)
    wrapper.eval()
    sets = dict(input_sets) if input_sets is not None else default_input_sets(spec)
    sess, provider, note = make_session(onnx_path, device)
    feed_names = {i.name for i in sess.get_inputs()}
    torch_dev = "cuda" if provider == "CUDAExecutionProvider" and torch.cuda.is_available() else "cpu"
    orig_dev = next((p.device for p in wrapper.parameters()), torch.device("cpu"))
    rows: list[ValidationRow] = []
    try:
        wrapper.to(torch_dev)
        for set_name, inputs in sets.items():
            with torch.no_grad():
                refs = wrapper(*(inputs[i.name].to(torch_dev) for i in spec.inputs))
            feed = {k: v.numpy() for k, v in inputs.items() if k in feed_names}
            try:
                got = sess.run(list(spec.outputs), feed)
            except Exception as e:  # noqa: BLE001
                raise ValidationError(f"onnxruntime failed to run {onnx_path.name} on input set '{set_name}' "
                                      f"({_first_line(e)}); the graph does not accept these shapes") from None
            for (name, axes), ref, g in zip(spec.outputs.items(), refs, got):
                ref_np = ref.detach().float().cpu().numpy()
                keep = _non_padding(inputs, ref_np, axes)
                rows.append(_compare(onnx_path.name, set_name, name, ref_np, np.asarray(g, dtype=np.float32),
                                     atol, rtol, keep, task == "causal-lm"))
    finally:
        wrapper.to(orig_dev)
    report = ValidationReport(rows, provider, note, atol, rtol)
    if raise_on_failure and not report.passed:
        raise ValidationError(report.failure_message())
    return report


# ----------------------------------------------------------------------------- benchmark


def _block_medians(fns: Mapping[str, Callable[[], Any]], warmup: int, repeat: int,
                   sync: Callable[[], None]) -> dict[str, float]:
    """Median ms per candidate, each timed in its own block (warm-up, then `repeat` runs),
    in two rounds of alternating order; the lower of its two medians is kept.

    Not round-robin: PyTorch's OpenMP workers keep spinning for a while after each call,
    so an onnxruntime call right after a PyTorch one competes with them for the cores
    (MiniLM 1x128: 42 ms round-robin vs 16 ms in a block)."""
    best: dict[str, float] = {}
    for order in (list(fns), list(reversed(list(fns)))):
        for key in order:
            fn = fns[key]
            for _ in range(warmup):
                fn()
            sync()
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            best[key] = min(best.get(key, float("inf")), statistics.median(times) * 1000.0)
    return best


def _ort_runner(sess, provider: str, spec: IOSpec, inputs: Mapping[str, torch.Tensor],
                targs: Sequence[torch.Tensor], cuda: bool) -> Callable[[], Any]:
    names = {i.name for i in sess.get_inputs()}
    if provider == "CUDAExecutionProvider" and cuda:
        # IOBinding: inputs read from and outputs left on the GPU, no host copies in the loop.
        binding = sess.io_binding()
        for i, t in zip(spec.inputs, targs):
            if i.name in names:
                binding.bind_input(i.name, "cuda", 0, np.int64 if t.dtype == torch.int64 else np.float32,
                                   list(t.shape), t.data_ptr())
        for o in sess.get_outputs():
            binding.bind_output(o.name, "cuda")
        return lambda: sess.run_with_iobinding(binding)
    feed = {k: v.numpy() for k, v in inputs.items() if k in names}
    return lambda: sess.run(None, feed)


def benchmark_onnx(files: Mapping[str, str | Path], torch_model: torch.nn.Module, task: str = "feature-extraction", *,
                   spec: IOSpec | None = None, device: str = "auto", threads: int | None = None,
                   shapes: Sequence[tuple[int, int]] = ((1, 128), (8, 128)), warmup: int = 3, repeat: int = 10,
                   extra_torch: Mapping[str, torch.nn.Module] | None = None) -> list[dict[str, Any]]:
    """Median latency (ms) after warm-up: PyTorch eager vs each ONNX file on onnxruntime, same threads.

    Sequence length is truncated to the model's position limit. Each candidate is timed in its own block (see _block_medians).
    On CUDA, onnxruntime runs with IOBinding (inputs and outputs stay on the GPU) and PyTorch is
    timed with synchronisation. torch_model / task / spec as for validate_onnx; extra_torch adds
    more PyTorch models with the same inputs (e.g. another attention implementation). One row per
    shape: {"batch", "sequence", "threads", "device", "torch_eager_ms", "torch_<extra>_ms",
    "ort_<key>_ms", "ort_<key>_provider"}.
    """
    wrapper, spec = _wrap(torch_model, task, spec)
    models = {"eager": wrapper} | {k: _wrap(m, task, spec)[0] for k, m in (extra_torch or {}).items()}
    threads = threads or torch.get_num_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[dict[str, Any]] = []
    sessions = {k: make_session(p, device, threads) for k, p in files.items()}
    cuda = any(s[1] == "CUDAExecutionProvider" for s in sessions.values()) and torch.cuda.is_available()
    tdev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    orig = {k: next((p.device for p in m.parameters()), torch.device("cpu")) for k, m in models.items()}
    try:
        for m in models.values():
            m.to(tdev).eval()
        for b, s in shapes:
            inputs = make_inputs(spec, b, s, seed=7)
            seq = next(iter(inputs.values())).shape[1] if inputs else s
            targs = [inputs[i.name].to(tdev).contiguous() for i in spec.inputs]
            fns: dict[str, Callable[[], Any]] = {}
            for k, m in models.items():
                def run_torch(m=m):
                    with torch.inference_mode():
                        return m(*targs)
                fns[f"torch_{k}_ms"] = run_torch
            for key, (sess, provider, _) in sessions.items():
                fns[f"ort_{key}_ms"] = _ort_runner(sess, provider, spec, inputs, targs, cuda)
            row: dict[str, Any] = {"batch": b, "sequence": seq, "threads": threads, "device": tdev}
            row.update(_block_medians(fns, warmup, repeat, sync))
            row.update({f"ort_{key}_provider": prov for key, (_, prov, _) in sessions.items()})
            rows.append(row)
    finally:
        for k, m in models.items():
            m.to(orig[k])
        torch.set_num_threads(old_threads)
    return rows


