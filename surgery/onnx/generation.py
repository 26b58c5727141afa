"""export-onnx for generation: a causal LM directory exported WITH its KV cache (surgery.onnx.decoder),
adapters merged in memory first, and its decode speed measured against PyTorch `generate`.

    if with_past(model_dir, opts):                    # task auto on a causal LM (cache=True), or
        result = export_generation(model_dir, out, opts)   # task text-generation-with-past
    rows = benchmark_generation("out/", model, device="cpu", contexts=(16, 240))

The output directory is self-contained (model.onnx, config.json, generation_config.json, the
tokenizer files, genai_config.json, manifest.json) for ORTModelForCausalLM and onnxruntime-genai.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.onnx.decoder import DecoderExport, export_decoder_with_past
from surgery.onnx.decoder_check import MANIFEST_FILE, MODEL_FILE
from surgery.options.export import LOGITS_ONLY_TASKS, WITH_PAST_TASK, ExportOptions

Progress = Callable[[str, int, int], None]

#: prompt lengths (tokens) of the with-past benchmark, cut to the model's context
CONTEXTS = (16, 240, 1024)
BENCH_NEW_TOKENS = 32


def with_past(model_dir: str | Path | None, opts: ExportOptions) -> bool:
    """Whether export_onnx exports `model_dir` with its KV cache: task text-generation-with-past, or
    task auto on a causal LM (config.json's architectures) with cache=True.

    Raises CheckpointError for an unreadable config or one asking for remote code.

    Example: with_past("fixtures/tiny-llama", ExportOptions()) is True; with cache=False, False."""
    if opts.task == WITH_PAST_TASK:
        return True
    if model_dir is None or opts.task != "auto" or not opts.cache:
        return False
    from surgery.onnx.model import read_config, resolve_task

    return resolve_task("auto", read_config(Path(model_dir))) == "causal-lm"


def logits_only_task(opts: ExportOptions) -> ExportOptions:
    """`opts` with task "text-generation" spelled as the loader's "causal-lm" (the same graph)."""
    return opts.replace(task="causal-lm") if opts.task in LOGITS_ONLY_TASKS else opts


def export_generation(model_dir: str | Path, out_dir: str | Path, opts: ExportOptions,
                      progress: Progress | None = None) -> DecoderExport:
    """A causal LM directory (adapters merged in memory) exported with its cache, validated by generation.

    Args:
        model_dir: a Hugging Face causal LM directory (offline, no remote code).
        out_dir: output directory (atomic; refused if it exists unless opts.overwrite).
        opts: ExportOptions (dtype, opset, exporter, device, validation, benchmark, atol/rtol, threads, adapters).
        progress: callback(stage, step, total).

    Returns:
        DecoderExport; its manifest (OUT_DIR/manifest.json) has the task, the variant, the provider
        that really ran and, with opts.benchmark, the latency rows.

    Raises:
        OptionError (optimize asked: the with-past export has one graph), CheckpointError,
        AdapterError, SurgeryError (a cache that is not key/value tensors, e.g. Mamba: nothing
        written), ValidationError (generation differs; files and a "failed" manifest land first).

    Example:
        r = export_generation("fixtures/tiny-llama", "out/gen", ExportOptions(device="cpu"))
        r.status, r.manifest["provider"]      # "ok", "CPUExecutionProvider"
    """
    from surgery.errors import OptionError
    from surgery.onnx.model import load_hf_model

    if opts.optimize:
        raise OptionError(f"optimize applies to the logits-only graph; the {WITH_PAST_TASK} export writes one graph "
                          "(set cache=False, or task 'text-generation', for an optimised logits-only graph)",
                          field="optimize")
    old_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        model, _, _ = load_hf_model(model_dir, "causal-lm", opts.adapters, allow_random_head=opts.allow_random_head)
        extra = {"source": str(model_dir), "adapters": [str(a) for a in opts.adapters], "benchmark": []}
        result = export_decoder_with_past(
            model, out_dir, dtype=opts.dtype, opset=opts.opset, validate=opts.validation, device=opts.device,
            tokenizer=Path(model_dir), overwrite=opts.overwrite, progress=progress, atol=opts.atol,
            rtol=opts.rtol, threads=opts.threads, manifest_extra=extra, exporter=opts.exporter)
        if opts.benchmark:
            rows = benchmark_generation(result.out_dir, model, device=opts.device, threads=opts.threads)
            result.manifest["benchmark"] = rows
            _rewrite_manifest(result.out_dir, result.manifest)
    finally:
        torch.set_num_threads(old_threads)
    return result


def _rewrite_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = out_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, out_dir / MANIFEST_FILE)


# ----------------------------------------------------------------------------- benchmark


def ort_decode(sess: Any, provider: str, prompt: Sequence[int], new: int) -> tuple[list[int], float, float]:
    """Greedy decode with the cache: (tokens, prefill ms, mean ms per decode step). On CUDA the cache
    stays on the GPU between steps (IOBinding: each step's present.* bound as the next past.*).

    Example: tokens, prefill_ms, ms_per_token = ort_decode(sess, "CPUExecutionProvider", [5, 6, 7], 16)"""
    ins = {i.name: i for i in sess.get_inputs()}
    outs = [o.name for o in sess.get_outputs()]
    pasts = sorted(n for n in ins if n.startswith("past_key_values."))
    kv_type = np.float16 if ins[pasts[0]].type == "tensor(float16)" else np.float32
    shape = ins[pasts[0]].shape
    empty = np.zeros((1, shape[1], 0, shape[3]), kv_type)
    cuda = provider == "CUDAExecutionProvider"
    if cuda:
        from surgery.onnx.files import ort

        cache: dict[str, Any] = {n: ort().OrtValue.ortvalue_from_numpy(empty, "cuda", 0) for n in pasts}
    else:
        cache = {n: empty for n in pasts}
    ids = np.array([list(prompt)], dtype=np.int64)
    mask = np.ones_like(ids)
    tokens, times = [], []
    for _ in range(new):
        fixed = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in ins:
            fixed["position_ids"] = np.arange(mask.shape[1] - ids.shape[1], mask.shape[1], dtype=np.int64)[None]
        t0 = time.perf_counter()
        if cuda:
            b = sess.io_binding()
            for n, v in fixed.items():
                b.bind_cpu_input(n, v)
            for n, v in cache.items():
                b.bind_ortvalue_input(n, v)
            for o in outs:
                b.bind_output(o, "cuda")
            sess.run_with_iobinding(b)
            res = dict(zip(outs, b.get_outputs(), strict=True))
            tok = int(res["logits"].numpy()[0, -1].argmax())
        else:
            res = dict(zip(outs, sess.run(None, fixed | cache), strict=True))
            tok = int(res["logits"][0, -1].argmax())
        times.append(time.perf_counter() - t0)
        tokens.append(tok)
        cache = {n: res[n.replace("past_key_values.", "present.")] for n in pasts}
        ids = np.array([[tok]], dtype=np.int64)
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
    return tokens, times[0] * 1e3, sum(times[1:]) / max(len(times) - 1, 1) * 1e3


def torch_generate_ms(model: Any, prompt: Sequence[int], new: int,
                      device: torch.device) -> tuple[list[int], float, float]:
    """PyTorch generate with its cache: (tokens, prefill ms = one-token generate, ms per further token)."""
    from transformers import GenerationConfig

    ids = torch.tensor([list(prompt)], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(n: int) -> tuple[list[int], float]:
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        sync()
        return out[0, len(prompt):].tolist(), time.perf_counter() - t0

    run(2)  # warm-up
    _, t1 = run(1)
    toks, tn = run(new)
    return toks, t1 * 1e3, (tn - t1) / max(new - 1, 1) * 1e3


def benchmark_generation(onnx_dir: str | Path, model: Any, *, device: str = "auto", threads: int | None = None,
                         contexts: Sequence[int] = CONTEXTS,
                         new_tokens: int = BENCH_NEW_TOKENS) -> list[dict[str, Any]]:
    """Prefill latency and per-token decode latency: the with-past graph on onnxruntime (IOBinding on
    CUDA when it really loads) vs PyTorch eager `generate` with its cache, greedy, batch 1.

    Args:
        onnx_dir: a directory written by export_decoder_with_past / export_generation.
        model: the exported causal LM (PyTorch side; copied to the graph's dtype/device if needed).
        device, threads: as ExportOptions (threads default: torch's current count).
        contexts: prompt lengths, cut to the model's context length (minus new_tokens).
        new_tokens: tokens generated per run (≥ 2).

    Returns:
        One row per context: {"context", "new_tokens", "device", "provider", "threads",
        "ort_prefill_ms", "ort_ms_per_token", "torch_prefill_ms", "torch_ms_per_token", "same_tokens"}.

    Raises:
        ValidationError: onnxruntime cannot load the graph.

    Example:
        benchmark_generation("out/gen", model, device="cpu", contexts=(16,))[0]["ort_ms_per_token"]
    """
    from surgery.onnx.check import make_session, torch_device
    from surgery.onnx.decoder_check import _reference_model

    threads = threads or torch.get_num_threads()
    sess, provider, _ = make_session(Path(onnx_dir) / MODEL_FILE, device, threads)
    kv = next(i for i in sess.get_inputs() if i.name.startswith("past_key_values."))
    tdev = torch_device(provider, device)
    ref = _reference_model(model, np.float16 if kv.type == "tensor(float16)" else np.float32, tdev)
    cfg = model.config.get_text_config()
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or max(contexts) * 2
    vocab = int(cfg.vocab_size)
    rows = []
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for ctx in sorted({max(1, min(c, int(limit) - new_tokens)) for c in contexts}):
            prompt = torch.randint(3, vocab, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
            ort_decode(sess, provider, prompt[:4], 2)  # warm-up
            o_tok, o_pre, o_tok_ms = ort_decode(sess, provider, prompt, new_tokens)
            t_tok, t_pre, t_tok_ms = torch_generate_ms(ref, prompt, new_tokens, tdev)
            rows.append({"context": ctx, "new_tokens": new_tokens, "device": tdev.type, "provider": provider,
                         "threads": threads, "ort_prefill_ms": round(o_pre, 3), "ort_ms_per_token": round(o_tok_ms, 3),
                         "torch_prefill_ms": round(t_pre, 3), "torch_ms_per_token": round(t_tok_ms, 3),
                         "same_tokens": o_tok == t_tok})
    finally:
        torch.set_num_threads(old)
    return rows
