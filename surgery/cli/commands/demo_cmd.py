"""surgery demo: the main job on the fixture pair."""

from __future__ import annotations

from pathlib import Path

import click

from ..main import cli
from ..util import echo_json, human_count, progress_bar, table

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"


@cli.command("demo")
@click.argument("base", required=False, type=click.Path(path_type=str))
@click.argument("ft", required=False, type=click.Path(path_type=str))
@click.option("--workdir", default="out/demo", show_default=True, type=click.Path(path_type=str),
              help="Where the adapter, merged model and ONNX files go (replaced on each run).")
@click.option("--rank", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--optimize/--no-optimize", default=True, show_default=True, help="Also export and validate the fused ONNX graph.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def demo_cmd(base, ft, workdir, rank, optimize, as_json):
    """Extract -> merge -> export -> validate, end to end, with a short report.

    Without arguments it runs on the fixture pair fixtures/tiny-bert and
    fixtures/tiny-bert-ft (a tiny BERT and its fine-tuned twin).

    \b
    Examples:
      surgery demo
      surgery demo fixtures/tiny-llama fixtures/tiny-llama-ft --workdir out/llama
    """
    from surgery.ops.pipeline import run_pipeline

    if (base is None) != (ft is None):
        raise click.UsageError("give both BASE and FT, or neither (the fixture pair)")
    base = base or str(FIXTURES / "tiny-bert")
    ft = ft or str(FIXTURES / "tiny-bert-ft")
    with progress_bar() as prog:
        rep = run_pipeline(base, ft, workdir, rank=rank, optimize=optimize, progress=prog)
    if as_json:
        echo_json(rep)
        return
    ex, mg, exp = rep["extract"], rep["merge"], rep["export"]
    w, o = mg["weights_vs_ft"], mg["outputs_vs_ft"]
    click.echo(f"surgery demo: {rep['base']} -> {rep['ft']} (rank {rep['rank']})")
    click.echo(f"1. extract-lora  {ex['out']}: {ex['modules']} LoRA modules, {human_count(ex['adapter_params'])} params "
               f"(+{human_count(ex['full_params'])} saved whole), overall relative error {ex['overall_rel_error']:.4f} "
               f"[{ex['seconds']:.1f} s]")
    click.echo(f"2. merge         {mg['out']}: {mg['changed']} tensors changed; merged vs fine-tune weights: "
               f"relative error {w['rel_error']:.4f} (extract reported {ex['overall_rel_error']:.4f}); outputs: "
               f"max |merged - ft| {o['merged_vs_ft_max_abs']:.2e} vs |base - ft| {o['base_vs_ft_max_abs']:.2e}, "
               f"cosine {o['merged_vs_ft_cosine']:.6f} [{mg['seconds']:.1f} s]")
    click.echo(f"3. export-onnx   {exp['out']}: exporter {exp['exporter']}, {exp['provider_note']} [{exp['seconds']:.1f} s]")
    rows = [[r["file"], r["input_set"], r["output"], "x".join(map(str, r["shape"])), f"{r['max_abs_diff']:.2e}",
             f"{r['mean_abs_diff']:.2e}", "ok" if r["passed"] else "FAIL"] for r in exp["validation"]]
    click.echo(table(rows, ["file", "inputs", "output", "shape", "max abs", "mean abs", ""], "llllrrl"))
    click.echo(f"4. validation    {exp['status']}; total {rep['seconds']:.1f} s")
