"""surgery export-onnx"""

from __future__ import annotations

import click

from surgery.errors import ValidationError
from surgery.onnx.export import DEFAULT_OPSET, TASKS, export_onnx

from ..main import cli
from ..util import echo_json, progress_bar, table


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


@cli.command("export-onnx")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Output directory.")
@click.option("--adapter", "adapters", multiple=True, type=click.Path(path_type=str),
              help="LoRA adapter merged into the model before export (repeatable).")
@click.option("--task", type=click.Choice(TASKS), default="auto", show_default=True)
@click.option("--opset", type=click.IntRange(min=14), default=DEFAULT_OPSET, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: fp16 weights with fp32 inputs/outputs, validated with looser tolerances.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Execution provider for validation (auto: CUDA when it really loads).")
@click.option("--optimize/--no-optimize", default=False, show_default=True,
              help="Also save onnxruntime's fused graph (model_optimized.onnx), validated the same way.")
@click.option("--atol", type=click.FloatRange(min=0), help="Absolute tolerance (default fp32 1e-4, fp16 1e-1).")
@click.option("--rtol", type=click.FloatRange(min=0), help="Relative tolerance (default fp32 1e-3, fp16 5e-2).")
@click.option("--no-validate", is_flag=True, help="Skip validation against PyTorch (not recommended).")
@click.option("--benchmark", is_flag=True, help="Time PyTorch eager vs onnxruntime at 1x128 and 8x128.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_cmd(model_dir, out, adapters, task, opset, dtype, device, optimize, atol, rtol, no_validate,
               benchmark, overwrite, as_json):
    """Export a Hugging Face model directory to ONNX and validate it against PyTorch.

    The export has symbolic batch and sequence axes and external weight data. It is
    compared with the eager PyTorch model on three input sets unlike the export's
    shapes (batch 1; an odd length; a padded batch). A mismatch beyond tolerance
    fails the command (exit 1); the files stay, marked failed in manifest.json.

    \b
    Examples:
      surgery export-onnx out/demo/merged -o out/onnx --optimize
      surgery export-onnx fixtures/tiny-llama -o out/llama-onnx --adapter fixtures/tiny-llama-lora
      surgery export-onnx MODEL -o out/onnx --dtype fp16 --device cuda --benchmark
    """
    with progress_bar() as prog:
        try:
            res = export_onnx(model_dir, out, adapters=adapters, task=task, opset=opset, dtype=dtype, device=device,
                              optimize=optimize, atol=atol, rtol=rtol, validate=not no_validate,
                              benchmark=benchmark, overwrite=overwrite, progress=prog)
        except ValidationError:
            # The files and a manifest marked "failed" are left for inspection; show the table first.
            import json
            from pathlib import Path

            man = Path(out) / "manifest.json"
            if man.is_file():
                rows = json.loads(man.read_text()).get("validation", {}).get("rows", [])
                if rows:
                    from surgery.onnx.export import ValidationRow

                    click.echo(render_validation([ValidationRow(**r) for r in rows]), err=True)
            raise
    if as_json:
        echo_json(res.manifest)
        return
    click.echo(f"exported {res.model_path} (+ {res.data_path.name}) with the {res.exporter} exporter"
               + (f"; {res.exporter_note}" if res.exporter_note else ""))
    if res.optimized_path:
        click.echo(f"optimised graph: {res.optimized_path}")
    if res.validation:
        click.echo(f"validation on {res.provider_note}:")
        click.echo(render_validation(res.validation))
    if res.benchmark:
        click.echo(render_benchmark(res.benchmark))
    click.echo(f"status: {res.status}; manifest: {res.manifest_path}")
