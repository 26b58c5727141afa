"""onnxruntime sessions, validation against PyTorch, and latency benchmarks.

The exporter produces files; this module checks them. A session runs on CUDA only when the
provider really loads (read back with get_providers(); onnxruntime-gpu lists CUDA even where
it cannot load it), and the PyTorch reference runs where onnxruntime ran.

    report = validate_onnx("out/model.onnx", model, "feature-extraction", device="cpu")
    report.passed, report.worst.max_abs_diff
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.core.hf import resolve_device
from surgery.errors import CheckpointError, ValidationError
from surgery.io.guards import escape_name
from surgery.onnx.files import first_line, ort
from surgery.onnx.model import default_input_sets, make_inputs, wrap
from surgery.onnx.spec import IOSpec, ValidationReport, ValidationRow
from surgery.options.export import ExportOptions

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: smallest output scale atol is multiplied by (an all-zero output still gets a tolerance)
SCALE_FLOOR = 1e-6

# ----------------------------------------------------------------------------- sessions


def _providers(device: str) -> tuple[list[Any], str]:
    """onnxruntime providers to ask for on `device`, and the note when CUDA is not even built in."""
    if device != "auto" and not device.startswith("cuda"):
        return [CPU], ""
    if CUDA not in ort().get_available_providers():
        return [CPU], "CUDA unavailable (onnxruntime built without CUDAExecutionProvider): validated on CPU"
    index = int(device.partition(":")[2] or 0)
    return [(CUDA, {"device_id": index}) if index else CUDA, CPU], ""


def make_session(path: str | Path, device: str = "auto", threads: int | None = None) -> tuple[Any, str, str]:
    """An InferenceSession on CUDA when asked/auto and it really loads, else on the CPU.

    Args:
        path: the ONNX graph file.
        device: "auto", "cpu", "cuda" or "cuda:N".
        threads: onnxruntime intra-op threads (None: its own choice).

    Returns:
        (session, provider that really runs, note saying why/where).

    Raises:
        ValidationError: onnxruntime cannot load the file.

    Example:
        sess, provider, note = make_session("out/model.onnx", "cpu")   # provider "CPUExecutionProvider"
    """
    rt = ort()
    so = rt.SessionOptions()
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    providers, note = _providers(device)
    try:
        sess = rt.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001
        raise ValidationError(f"onnxruntime cannot load {escape_name(Path(path).name)} ({first_line(e)}); "
                              f"try a lower opset") from None
    used = sess.get_providers()[0]
    if len(providers) > 1 and used != CUDA:
        note = "CUDA unavailable: validated on CPU"  # onnxruntime-gpu lists CUDA even when it can't load it
    elif device == "cpu":
        note = "CPU requested"
    elif used == CUDA:
        note = "validated on CUDA"
    return sess, used, note


def torch_device(provider: str, device: str = "auto") -> torch.device:
    """Where the PyTorch reference runs: the GPU onnxruntime runs on when torch sees it too, else the CPU."""
    if provider != CUDA or not torch.cuda.is_available():
        return torch.device("cpu")
    return resolve_device(device if device.startswith("cuda") else "cuda")


# ----------------------------------------------------------------------------- validation


def _non_padding(inputs: Mapping[str, torch.Tensor], ref: np.ndarray, axes: Mapping[int, str]) -> np.ndarray | None:
    """Boolean (batch, seq) mask of real tokens when the output has batch and sequence axes."""
    mask = inputs.get("attention_mask")
    if mask is None or axes.get(0) != "batch" or axes.get(1) != "sequence" or ref.ndim < 2:
        return None
    m = mask.numpy().astype(bool)
    return m if m.shape == ref.shape[:2] else None


def compare(file: str, set_name: str, name: str, ref: np.ndarray, got: np.ndarray, atol: float, rtol: float,
            keep: np.ndarray | None, causal: bool) -> ValidationRow:
    """One validation row: `got` (onnxruntime) against `ref` (PyTorch) where `keep` is true.

    A value passes when |got - ref| <= atol*scale + rtol*|ref|, scale = max |ref| of this output
    (at least SCALE_FLOOR): atol is relative to the output's own magnitude, so an fp16 tolerance
    of 0.1 does not pass a zeroed head whose logits are all ~0.04. tol_ratio is the worst overshoot."""
    if got.shape != ref.shape:
        inf = float("inf")
        return ValidationRow(file, set_name, name, list(got.shape), inf, inf, inf, inf, False)
    r = ref[keep] if keep is not None else ref  # padding positions are don't-care
    g = got[keep] if keep is not None else got
    r = r.astype(np.float64)
    g = g.astype(np.float64)
    diff = np.abs(g - r)
    finite = bool(np.isfinite(g).all())
    scale = max(float(np.abs(r[np.isfinite(r)]).max()) if r.size and np.isfinite(r).any() else 0.0, SCALE_FLOOR)
    big = np.abs(r) > atol * scale
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff[big] / np.abs(r[big])).max()) if big.any() else 0.0
    denom = atol * scale + rtol * np.abs(r)
    # atol = rtol = 0 demands exact equality: any difference is an infinite overshoot.
    over = np.divide(diff, denom, out=np.where(diff > 0, np.inf, 0.0), where=denom > 0)
    ratio = float(over.max()) if diff.size else 0.0
    if not finite:
        max_abs = ratio = float("inf")
    top1 = None
    if causal and r.ndim >= 2:
        top1 = float((g.argmax(-1) == r.argmax(-1)).mean())
    return ValidationRow(file, set_name, name, list(ref.shape), max_abs, max_rel,
                         float(diff.mean()) if diff.size else 0.0, ratio, finite and ratio <= 1.0, top1, scale)


def _check_set(sess: Any, file: str, wrapper: torch.nn.Module, spec: IOSpec, set_name: str,
               inputs: Mapping[str, torch.Tensor], tdev: torch.device, tol: tuple[float, float],
               causal: bool) -> list[ValidationRow]:
    """Rows for one input set: every output of the session against the wrapper's."""
    feed_names = {i.name for i in sess.get_inputs()}
    with torch.no_grad():
        refs = wrapper(*(inputs[i.name].to(tdev) for i in spec.inputs))
    feed = {k: v.numpy() for k, v in inputs.items() if k in feed_names}
    try:
        got = sess.run(list(spec.outputs), feed)
    except Exception as e:  # noqa: BLE001
        raise ValidationError(f"onnxruntime failed to run {escape_name(file)} on input set '{set_name}' "
                              f"({first_line(e)}); the graph does not accept these shapes") from None
    rows = []
    for (name, axes), ref, g in zip(spec.outputs.items(), refs, got, strict=False):
        ref_np = ref.detach().float().cpu().numpy()
        keep = _non_padding(inputs, ref_np, axes)
        rows.append(compare(file, set_name, name, ref_np, np.asarray(g, dtype=np.float32), *tol, keep, causal))
    return rows


def validate_onnx(onnx_path: str | Path, torch_model: torch.nn.Module, task: str = "feature-extraction", *,
                  spec: IOSpec | None = None, input_sets: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                  dtype: str = "fp32", atol: float | None = None, rtol: float | None = None, device: str = "auto",
                  threads: int | None = None, raise_on_failure: bool = True) -> ValidationReport:
    """Run onnx_path on onnxruntime and compare each output with eager PyTorch.

    Args:
        onnx_path: the graph file.
        torch_model: a transformers model (its inputs/outputs derive from config and task), or
            any nn.Module with `spec` giving its inputs/outputs.
        task: as for export ("feature-extraction", "sequence-classification", "causal-lm", "custom").
        spec: inputs/outputs (required for a plain nn.Module).
        input_sets: {name: {input: tensor}}; default: default_input_sets(spec).
        dtype, atol, rtol, device, threads: as in ExportOptions (tolerances default by dtype).
        raise_on_failure: raise on a difference above tolerance (the report carries every row either way).

    Returns:
        The ValidationReport (rows, provider that really ran, its note, tolerances).

    Raises:
        CheckpointError: onnx_path does not exist.
        OptionError: a bad dtype/device/tolerance.
        ValidationError: onnxruntime cannot load or run the file, or (raise_on_failure) a row failed.

    Example:
        validate_onnx("out/model.onnx", load_hf_model("fixtures/tiny-bert")[0], device="cpu").passed
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CheckpointError(f"{escape_name(onnx_path)} does not exist; export the model first")
    opts = ExportOptions(dtype=dtype, device=device, atol=atol, rtol=rtol, threads=threads)
    wrapper, spec = wrap(torch_model, task, spec)
    wrapper.eval()
    sets = dict(input_sets) if input_sets is not None else default_input_sets(spec, left_padded=task == "causal-lm")
    sess, provider, note = make_session(onnx_path, opts.device, opts.threads)
    tdev = torch_device(provider, opts.device)
    orig_dev = next((p.device for p in wrapper.parameters()), torch.device("cpu"))
    rows: list[ValidationRow] = []
    try:
        wrapper.to(tdev)
        for set_name, inputs in sets.items():
            rows += _check_set(sess, onnx_path.name, wrapper, spec, set_name, inputs, tdev, opts.tolerances(),
                               task == "causal-lm")
    finally:
        wrapper.to(orig_dev)
    report = ValidationReport(rows, provider, note, *opts.tolerances())
    if raise_on_failure and not report.passed:
        raise ValidationError(report.failure_message(), report=report)
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


def _ort_runner(sess: Any, provider: str, spec: IOSpec, inputs: Mapping[str, torch.Tensor],
                targs: Sequence[torch.Tensor], tdev: torch.device) -> Callable[[], Any]:
    names = {i.name for i in sess.get_inputs()}
    if provider == CUDA and tdev.type == "cuda":
        # IOBinding: inputs read from and outputs left on the GPU, no host copies in the loop.
        binding = sess.io_binding()
        for i, t in zip(spec.inputs, targs, strict=True):
            if i.name in names:
                binding.bind_input(i.name, "cuda", tdev.index or 0, np.int64 if t.dtype == torch.int64 else np.float32,
                                   list(t.shape), t.data_ptr())
        for o in sess.get_outputs():
            binding.bind_output(o.name, "cuda", tdev.index or 0)
        return lambda: sess.run_with_iobinding(binding)
    feed = {k: v.numpy() for k, v in inputs.items() if k in names}
    return lambda: sess.run(None, feed)


def _torch_runner(model: torch.nn.Module, targs: Sequence[torch.Tensor]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(*targs)

    return run


def _bench_shape(models: Mapping[str, torch.nn.Module], sessions: Mapping[str, tuple[Any, str, str]],
                 spec: IOSpec, batch: int, seq: int, tdev: torch.device, threads: int, warmup: int,
                 repeat: int) -> dict[str, Any]:
    """One benchmark row: every PyTorch model and every session on the same inputs."""
    inputs = make_inputs(spec, batch, seq, seed=7)
    seq = next(iter(inputs.values())).shape[1] if inputs else seq
    targs = [inputs[i.name].to(tdev).contiguous() for i in spec.inputs]
    fns: dict[str, Callable[[], Any]] = {f"torch_{k}_ms": _torch_runner(m, targs) for k, m in models.items()}
    for key, (sess, provider, _) in sessions.items():
        fns[f"ort_{key}_ms"] = _ort_runner(sess, provider, spec, inputs, targs, tdev)
    sync = torch.cuda.synchronize if tdev.type == "cuda" else (lambda: None)
    row: dict[str, Any] = {"batch": batch, "sequence": seq, "threads": threads, "device": tdev.type}
    row.update(_block_medians(fns, warmup, repeat, sync))
    row.update({f"ort_{key}_provider": prov for key, (_, prov, _) in sessions.items()})
    return row


def benchmark_onnx(files: Mapping[str, str | Path], torch_model: torch.nn.Module, task: str = "feature-extraction", *,
                   spec: IOSpec | None = None, device: str = "auto", threads: int | None = None,
                   shapes: Sequence[tuple[int, int]] = ((1, 128), (8, 128)), warmup: int = 3, repeat: int = 10,
                   extra_torch: Mapping[str, torch.nn.Module] | None = None) -> list[dict[str, Any]]:
    """Median latency (ms) after warm-up: PyTorch eager vs each ONNX file on onnxruntime, same threads.

    Sequence length is truncated to the model's position limit. Each candidate is timed in its
    own block (see _block_medians). On CUDA, onnxruntime runs with IOBinding (inputs and
    outputs stay on the GPU) and PyTorch is timed with synchronisation.

    Args:
        files: {key: graph file}, e.g. {"plain": "out/model.onnx"}.
        torch_model, task, spec: as for validate_onnx.
        device, threads: as in ExportOptions (threads default: torch's current count).
        shapes: (batch, sequence) pairs, one row each.
        extra_torch: more PyTorch models with the same inputs (e.g. another attention implementation).

    Returns:
        One row per shape: {"batch", "sequence", "threads", "device", "torch_eager_ms",
        "torch_<extra>_ms", "ort_<key>_ms", "ort_<key>_provider"}.

    Example:
        benchmark_onnx({"plain": "out/model.onnx"}, model, device="cpu", threads=2)[0]["ort_plain_ms"]
    """
    wrapper, spec = wrap(torch_model, task, spec)
    models = {"eager": wrapper} | {k: wrap(m, task, spec)[0] for k, m in (extra_torch or {}).items()}
    threads = threads or torch.get_num_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    sessions = {k: make_session(p, device, threads) for k, p in files.items()}
    provider = CUDA if any(s[1] == CUDA for s in sessions.values()) else CPU
    tdev = torch_device(provider, device)
    orig = {k: next((p.device for p in m.parameters()), torch.device("cpu")) for k, m in models.items()}
    try:
        for m in models.values():
            m.to(tdev).eval()
        return [_bench_shape(models, sessions, spec, b, s, tdev, threads, warmup, repeat) for b, s in shapes]
    finally:
        for k, m in models.items():
            m.to(orig[k])
        torch.set_num_threads(old_threads)
