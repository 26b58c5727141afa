"""surgery export-onnx"""

from __future__ import annotations

import click

from surgery.errors import ValidationError
from surgery.options.export import (
    DEFAULT_OPSET,
    EXPORTERS,
    ONNX_DTYPES,
    POOLINGS,
    QUANTIZATIONS,
    TASK_ALIASES,
    TASKS,
    ExportOptions,
)

from ..main import cli
from ..util import (
    build_options,
    device_option,
    dtype_option,
    echo_json,
    json_option,
    out_option,
    overwrite_option,
    progress_bar,
    quiet_option,
    table,
    threads_option,
)


def render_validation(rows) -> str:
    body = [[r.file, r.input_set, r.output, "x".join(map(str, r.shape)), f"{r.max_abs_diff:.2e}",
             f"{r.max_rel_diff:.2e}", f"{r.mean_abs_diff:.2e}",
             "" if r.top1_agreement is None else f"{100 * r.top1_agreement:.1f}%", "ok" if r.passed else "FAIL"]
            for r in rows]
    return table(body, ["file", "inputs", "output", "shape", "max abs", "max rel", "mean abs", "top-1", ""],
                 "llllrrrrl")


def render_benchmark(rows) -> str:
    keys = [k for k in rows[0] if k.endswith("_ms")]
    body = []
    for r in rows:
        eager = r["torch_eager_ms"]
        body.append([f"{r['batch']}x{r['sequence']}", r["device"], r["threads"]] +
                    [f"{r[k]:.2f}" + ("" if k == "torch_eager_ms" else f" ({r[k] / eager:.2f}x)") for k in keys])
    return table(body, ["shape", "device", "threads"] + [k.removesuffix("_ms") + " ms" for k in keys],
                 "lll" + "r" * len(keys))


def generation_line(v) -> str:
    """One line for a GenerationReport: provider, steps, prompt sets, worst tolerance ratio, verdict."""
    w = v.worst
    return (f"validation ({v.provider_note or v.provider}): greedy {v.new_tokens} tokens, "
            f"{len(v.rows)} steps, prompt sets {', '.join(v.prompt_lengths)}; worst "
            f"{w.tol_ratio if w else 0:.3g}x the tolerance; "
            f"{'same tokens as PyTorch generate' if v.passed else v.failure_message()}")


def render_seq2seq(res) -> str:
    """An encoder-decoder export (Seq2SeqExport): graphs, side files, validation by generation."""
    from surgery.io import escape_name

    m = res.manifest
    graphs = ", ".join(res.files.values())
    lines = [f"exported {graphs} into {escape_name(res.out_dir)} ({m['task']}, {res.dtype}, Optimum's layout) with "
             f"the {res.exporter} exporter; side files: {', '.join(m['files']['side_files']) or 'none'}"]
    if res.validation is not None:
        lines.append(generation_line(res.validation))
    lines.append(f"status: {res.status}; manifest: {escape_name(res.out_dir / 'manifest.json')}")
    return "\n".join(lines)


def render_generation(res) -> str:
    """A with-past export (DecoderExport): files, validation by generation, benchmark rows."""
    from surgery.io import escape_name

    m = res.manifest
    side = ", ".join(m["files"]["side_files"] + ["genai_config.json"])
    lines = [f"exported {escape_name(res.model_path)} with its KV cache (text-generation-with-past, {res.dtype}) "
             f"with the {res.exporter} exporter; side files: {side}"]
    if res.validation is not None:
        lines.append(generation_line(res.validation))
    rows = m.get("benchmark") or []
    if rows:
        body = [[r["context"], r["provider"].removesuffix("ExecutionProvider"), r["threads"],
                 f"{r['torch_prefill_ms']:.2f}", f"{r['ort_prefill_ms']:.2f}", f"{r['torch_ms_per_token']:.2f}",
                 f"{r['ort_ms_per_token']:.2f} ({r['ort_ms_per_token'] / r['torch_ms_per_token']:.2f}x)",
                 "yes" if r["same_tokens"] else "no"] for r in rows]
        lines.append(table(body, ["context", "provider", "threads", "torch prefill ms", "ort prefill ms",
                                  "torch ms/token", "ort ms/token", "same tokens"], "lllrrrrl"))
    lines.append(f"status: {res.status}; manifest: {escape_name(res.out_dir / 'manifest.json')}")
    return "\n".join(lines)


def render_export(res) -> str:
    from surgery.io import escape_name

    if hasattr(res, "layout"):  # DecoderExport (with past) or Seq2SeqExport (encoder-decoder)
        return render_generation(res) if hasattr(res, "model_path") else render_seq2seq(res)

    lines = [f"exported {escape_name(res.model_path)} (+ {escape_name(res.data_path.name)}) with the {res.exporter} "
             "exporter" + (f"; {escape_name(res.exporter_note)}" if res.exporter_note else "")]
    if res.optimized_path:
        lines.append(f"optimised graph: {escape_name(res.optimized_path)}")
    if res.quantization:
        worst = min((r["min_cosine"] or 0.0) for r in res.quantization["rows"] if r.get("gated", True))
        lines.append(f"int8 graph: {escape_name(res.out_dir / res.quantization['file'])} (worst cosine {worst:.4f}, "
                     f"{'ok' if res.quantization['passed'] else 'FAIL'})")
    if res.validation:
        lines += [f"validation on {res.provider_note}:", render_validation(res.validation)]
    if res.benchmark:
        lines.append(render_benchmark(res.benchmark))
    lines.append(f"status: {res.status}; manifest: {escape_name(res.manifest_path)}")
    return "\n".join(lines)


@cli.command("export-onnx")
@click.argument("model_dir", type=click.Path(path_type=str))
@out_option()
@click.option("--adapter", "adapters", multiple=True, type=click.Path(path_type=str),
              help="LoRA adapter merged into the model before export (repeatable).")
@click.option("--task", type=click.Choice(TASKS + tuple(TASK_ALIASES)), default="auto", show_default=True,
              help="What the graph computes, Optimum's names (auto: the head config.json's architectures name; "
                   "a causal LM is exported with its KV cache, text-generation-with-past).")
@click.option("--pooling", type=click.Choice(POOLINGS), default="auto", show_default=True,
              help="Sentence-transformers pooling in the graph, output sentence_embedding "
                   "(auto: from 1_Pooling/config.json beside the model).")
@click.option("--normalize/--no-normalize", default=None,
              help="L2-normalise the pooled embedding (default: as modules.json says).")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default=None,
              help="Also write model_int8.onnx (onnxruntime dynamic quantisation, CPU), checked at the task level.")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(EXPORTERS), default="auto", show_default=True,
              help="torch.onnx exporter. auto: the faster one that gives a correct graph, the other as fallback "
                   "(legacy TorchScript first, each graph checked against PyTorch at other sizes); "
                   "dynamo / legacy: that one only. manifest.json says which ran and why.")
@dtype_option("fp16: fp16 weights with fp32 inputs/outputs, validated with looser tolerances.",
              choices=ONNX_DTYPES, default="fp32")
@device_option("Execution provider for validation (auto: CUDA when it really loads, else CPU).")
@click.option("--optimize/--no-optimize", default=False, show_default=True,
              help="Also save an optimised graph (model_optimized.onnx), validated the same way.")
@click.option("--atol", type=float,
              help="Tolerance relative to each output's max |value| (default fp32 1e-4, fp16 1e-1).")
@click.option("--rtol", type=float, help="Relative tolerance (default fp32 1e-3, fp16 5e-2).")
@click.option("--validate/--no-validate", "validation", default=True, show_default=True,
              help="Compare onnxruntime with PyTorch (--no-validate: not recommended).")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Causal LMs and encoder-decoders: export with the KV cache for generation (--no-cache: "
                   "logits only / no decoder_with_past_model.onnx).")
@click.option("--benchmark", is_flag=True,
              help="Time PyTorch eager vs onnxruntime (with cache: prefill and ms/token at contexts 16/240/1024).")
@click.option("--allow-random-head", is_flag=True,
              help="Accept a task head the checkpoint lacks, randomly initialised (its outputs mean nothing).")
@threads_option()
@overwrite_option("an existing output directory")
@json_option("Print the manifest as JSON.")
@quiet_option()
@click.pass_context
def export_cmd(ctx, model_dir, out, as_json, quiet, **fields):
    """Export a Hugging Face model directory to ONNX and validate it against PyTorch.

    The export has symbolic batch and sequence axes and external weight data. It is
    compared with the eager PyTorch model on three input sets unlike the export's
    shapes (batch 1; an odd length; a padded batch). A mismatch beyond tolerance
    fails the command (exit 1); the files stay, marked failed in manifest.json.

    A causal LM is exported for generation: one graph with its KV cache (Optimum's
    text-generation-with-past layout; ORTModelForCausalLM and onnxruntime-genai run
    the directory as written), validated by greedy decoding against PyTorch generate.
    --no-cache (or --task text-generation) exports the logits-only graph for scoring.

    An encoder-decoder (T5, BART, Marian, Whisper *ForConditionalGeneration) is exported
    as Optimum's text2text-generation-with-past (Whisper: automatic-speech-recognition-
    with-past): encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx,
    which ORTModelForSeq2SeqLM / ORTModelForSpeechSeq2Seq load; --no-cache leaves out
    the with-past decoder.

    \b
    Examples:
      surgery export-onnx out/demo/merged -o out/onnx --optimize
      surgery export-onnx fixtures/tiny-llama -o out/llama-onnx --adapter fixtures/tiny-llama-lora
      surgery export-onnx MODEL -o out/onnx --dtype fp16 --device cuda --benchmark
      surgery export-onnx fixtures/tiny-llama -o out/llama-scoring --no-cache
      surgery export-onnx all-MiniLM-L6-v2 -o out/st --quantize int8 --benchmark   # sentence_embedding
      surgery export-onnx vit-checkpoint -o out/vit --task image-classification
    """
    opts = build_options(ExportOptions, ctx, **fields)
    from surgery.onnx.export import export_onnx

    with progress_bar(enabled=not quiet) as prog:
        try:
            res = export_onnx(model_dir, out, opts, progress=prog)
        except ValidationError as e:
            # The files and a manifest marked "failed" are left for inspection; show the table first.
            rows = getattr(e.report, "validation", None)
            if rows and not quiet:
                click.echo(render_validation(rows), err=True)
            raise
    if as_json:
        echo_json(res.manifest if hasattr(res, "layout") else res.to_json())
        return
    click.echo(render_export(res))
