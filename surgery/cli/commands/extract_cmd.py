"""surgery extract-lora"""

from __future__ import annotations

import json
from pathlib import Path

import click

from surgery.ops.extract import extract_lora

from ..main import cli
from ..util import BudgetType, RegexType, echo_json, human_count, progress_bar, table
from .refine_cmd import refine_options, render_refine


def render_extract(res, top: int | None = 20) -> str:
    rows = sorted(res.modules, key=lambda m: -m.rel_error)
    shown = rows if top is None else rows[:top]
    lines = [table(
        [[m.module, m.kind, f"{m.shape[0]}x{m.shape[1]}", m.rank, human_count(m.params),
          f"{m.rel_change:.2e}", f"{m.rel_error:.4f}", f"{100 * m.energy_kept:.2f}%"] for m in shown],
        ["module", "kind", "shape", "rank", "params", "|d|/|W|", "rel err", "energy"], "lllrrrrr")]
    if len(rows) > len(shown):
        lines.append(f"... {len(rows) - len(shown)} more modules (worst first; full list with --report)")
    share = 100 * (res.adapter_params + res.full_params) / max(res.model_params, 1)
    lines.append(
        f"{len(res.modules)} LoRA modules, {human_count(res.adapter_params)} LoRA params"
        f" + {human_count(res.full_params)} saved whole ({len(res.full)} tensors) = {share:.2f}% of the model;"
        f" overall relative error {res.overall_rel_error:.4f}; {res.seconds:.1f} s"
    )
    for s in res.skipped:
        lines.append(f"skipped {s['tensor']}: {s['why']}")
    for n in res.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


@cli.command("extract-lora")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("ft", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Adapter directory to write.")
@click.option("--rank", type=click.IntRange(min=1), help="Fixed rank for every module (default 16).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Smallest rank keeping this fraction of each delta's energy.")
@click.option("--budget", type=BudgetType(), help="Total LoRA parameters spread over all modules: a count (2e6) or a share of the model (1%).")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True)
@click.option("--niter", type=click.IntRange(min=0), default=4, show_default=True, help="Power iterations (randomized SVD).")
@click.option("--max-rank", type=click.IntRange(min=1), help="Rank cap for --energy/--budget (default 256 unless --svd exact).")
@click.option("--include", multiple=True, type=RegexType(), help="Only modules matching this regex (repeatable).")
@click.option("--exclude", multiple=True, type=RegexType(), help="Skip modules matching this regex (repeatable).")
@click.option("--embeddings", type=click.Choice(["lora", "full", "skip"]), default="lora", show_default=True)
@click.option("--other-deltas", type=click.Choice(["full", "skip"]), default="full", show_default=True,
              help="Norm deltas: saved whole (modules_to_save) or skipped.")
@click.option("--bias", "bias", type=click.Choice(["lora", "skip"]), default="lora", show_default=True,
              help="Bias deltas as lora_B.bias (lora_bias: true) or skipped.")
@click.option("--serving-safe", is_flag=True, help="No modules_to_save (some servers reject it): --other-deltas skip, embeddings never saved whole.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), help="Adapter dtype (default: the base's).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--task-type", help="PEFT task_type to record (default null: loads onto any model class).")
@click.option("--report", type=click.Path(path_type=str), help="Write the full report as JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--refine", is_flag=True, help="Then train the factors to match FT's outputs on --calibration text.")
@refine_options(prefix=True)
def extract_cmd(base, ft, out, rank, energy, budget, svd, niter, max_rank, include, exclude, embeddings,
                other_deltas, bias, serving_safe, dtype, device, seed, task_type, report, overwrite, as_json, quiet,
                refine, calibration, refine_steps, refine_lr, refine_batch, max_length, objective, holdout,
                eval_every, threads):
    """Compress the delta FT - BASE into a PEFT LoRA adapter.

    Streams one tensor pair at a time, decomposes each delta with a truncated SVD
    (randomized with oversampling where it is faster, exact otherwise) and reports
    the exact error of every module.

    \b
    Examples:
      surgery extract-lora fixtures/tiny-bert fixtures/tiny-bert-ft -o out/lora --rank 4
      surgery extract-lora base/ ft/ -o lora/ --energy 0.9 --max-rank 64 --report report.json
      surgery extract-lora base/ ft/ -o lora/ --budget 1% --serving-safe
      surgery extract-lora base/ ft/ -o lora/ --rank 8 --refine --calibration texts.txt
    """
    if serving_safe:
        if embeddings == "full":
            raise click.UsageError("--serving-safe cannot be combined with --embeddings full")
        other_deltas = "skip"
    if refine and calibration is None:
        raise click.UsageError("--refine needs --calibration FILE (unlabeled text, one sample per line)")
    if calibration is not None and not refine:
        raise click.UsageError("--calibration is used by --refine; add --refine")
    kw = dict(rank=rank, energy=energy, budget=budget, svd=svd, niter=niter, max_rank=max_rank,
              include=include, exclude=exclude, embeddings=embeddings, other_deltas=other_deltas, bias=bias,
              dtype=dtype, device=device, seed=seed, task_type=task_type, overwrite=overwrite)
    ref = None
    if report:
        from surgery.io import check_report_path

        check_report_path(report, [Path(base), Path(ft)], overwrite)
    with progress_bar(not quiet) as prog:
        if refine:
            from surgery.ops.refine import extract_and_refine

            res, ref = extract_and_refine(
                base, ft, out, calibration=calibration, refine_steps=refine_steps, refine_lr=refine_lr,
                refine_batch=refine_batch, max_length=max_length, objective=objective, holdout=holdout,
                eval_every=eval_every, threads=threads, progress=prog, **kw)
        else:
            res = extract_lora(base, ft, out, progress=prog, **kw)
    if serving_safe and res.full:
        click.echo(f"warning: {len(res.full)} tensors were saved whole (vocabulary growth)", err=True)
    data = res.to_json() if ref is None else {**res.to_json(), "refine": ref.to_json()}
    if report:
        from surgery.io import write_text_atomic

        write_text_atomic(report, json.dumps(data, indent=2) + "\n")
    if as_json:
        echo_json(data)
    else:
        click.echo(render_extract(res), err=True)
        if ref is not None:
            click.echo(render_refine(ref), err=True)
        click.echo(f"wrote {out}: {len(res.modules)} LoRA modules, overall relative error {res.overall_rel_error:.4f}")
