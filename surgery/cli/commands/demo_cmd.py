"""surgery demo: the main job on the fixture pair."""

from __future__ import annotations

from pathlib import Path

import click

from surgery.options.demo import DemoOptions

from ..main import cli
from ..util import build_options, echo_json, human_count, json_option, progress_bar, quiet_option, table

# The fixture pair ships with the source tree (repository root), not inside the package.
FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"


def _fixture_pair() -> tuple[str, str]:
    base, ft = FIXTURES / "tiny-bert", FIXTURES / "tiny-bert-ft"
    if not (base.is_dir() and ft.is_dir()):
        raise click.UsageError(f"the fixture pair is not here ({FIXTURES} ships with the source tree); "
                               "give BASE and FT")
    return str(base), str(ft)


def render_demo(rep: dict) -> str:
    from surgery.io import escape_name as esc

    ex, mg, exp = rep["extract"], rep["merge"], rep["export"]
    w, o = mg["weights_vs_ft"], mg["outputs_vs_ft"]
    rows = [[r["file"], r["input_set"], r["output"], "x".join(map(str, r["shape"])), f"{r['max_abs_diff']:.2e}",
             f"{r['mean_abs_diff']:.2e}", "ok" if r["passed"] else "FAIL"] for r in exp["validation"]]
    return "\n".join([
        f"surgery demo: {esc(rep['base'])} -> {esc(rep['ft'])} (rank {rep['rank']})",
        f"1. extract-lora  {esc(ex['out'])}: {ex['modules']} LoRA modules, {human_count(ex['adapter_params'])} params "
        f"(+{human_count(ex['full_params'])} saved whole), overall relative error {ex['overall_rel_error']:.4f} "
        f"[{ex['seconds']:.1f} s]",
        f"2. merge         {esc(mg['out'])}: {mg['changed']} tensors changed; merged vs fine-tune weights: "
        f"relative error {w['rel_error']:.4f} (extract reported {ex['overall_rel_error']:.4f}); outputs: "
        f"max |merged - ft| {o['merged_vs_ft_max_abs']:.2e} vs |base - ft| {o['base_vs_ft_max_abs']:.2e}, "
        f"cosine {o['merged_vs_ft_cosine']:.6f} [{mg['seconds']:.1f} s]",
        f"3. export-onnx   {esc(exp['out'])}: exporter {exp['exporter']}, {exp['provider_note']} "
        f"[{exp['seconds']:.1f} s]",
        table(rows, ["file", "inputs", "output", "shape", "max abs", "mean abs", ""], "llllrrl"),
        f"4. validation    {exp['status']}; total {rep['seconds']:.1f} s",
    ])


@cli.command("demo")
@click.argument("base", required=False, type=click.Path(path_type=str))
@click.argument("ft", required=False, type=click.Path(path_type=str))
@click.option("--workdir", default="out/demo", show_default=True, type=click.Path(path_type=str),
              help="Where the adapter, merged model and ONNX files go (replaced on each run).")
@click.option("--rank", type=int, default=4, show_default=True, help="LoRA rank of the extracted adapter.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Also export and validate the optimised ONNX graph.")
@json_option("Print the report as JSON.")
@quiet_option()
@click.pass_context
def demo_cmd(ctx, base, ft, workdir, as_json, quiet, **fields):
    """Extract -> merge -> export -> validate, end to end, with a short report.

    Without arguments it runs on the fixture pair fixtures/tiny-bert and
    fixtures/tiny-bert-ft (a tiny BERT and its fine-tuned twin).

    \b
    Examples:
      surgery demo
      surgery demo fixtures/tiny-llama fixtures/tiny-llama-ft --workdir out/llama
    """
    if (base is None) != (ft is None):
        raise click.UsageError("give both BASE and FT, or neither (the fixture pair)")
    opts = build_options(DemoOptions, ctx, **fields)
    if base is None:
        base, ft = _fixture_pair()
    from surgery.ops.pipeline import run_pipeline

    with progress_bar(enabled=not quiet) as prog:
        rep = run_pipeline(base, ft, workdir, opts, progress=prog)
    if as_json:
        echo_json(rep)
    else:
        click.echo(render_demo(rep))
