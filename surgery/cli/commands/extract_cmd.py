"""surgery extract-lora: parse the flags into ExtractOptions, call the library, render."""

from __future__ import annotations

import json
from pathlib import Path

import click

from surgery.options.extract import BIAS_MODES, EMBEDDING_MODES, OTHER_DELTA_MODES, SVD_METHODS, ExtractOptions

from ..main import cli
from ..util import (
    build_options,
    check_plot,
    device_option,
    dtype_option,
    echo_json,
    human_count,
    json_option,
    note_lines,
    out_option,
    overwrite_option,
    plot_option,
    progress_bar,
    quiet_option,
    shown_line,
    table,
    threads_option,
    warning_lines,
)
from .refine_cmd import build_refine_options, refine_flags, render_refine

EXTRACT_HEADERS = ["module", "kind", "shape (out x in)", "rank", "params", "|d|/|W|", "rel. error |d-BA|/|d|",
                   "energy kept (%)"]


def _module_counts(res) -> str:
    """"N LoRA modules" (+ "K as rows (trainable tokens)") of an ExtractResult."""
    n_rows = sum(m.method == "rows" for m in res.modules)
    return f"{len(res.modules) - n_rows} LoRA modules" + (f" + {n_rows} as rows (trainable tokens)" if n_rows else "")


def render_extract(res, top: int | None = 20, ctx: click.Context | None = None) -> str:
    """The stderr report of an ExtractResult: the TOP worst modules (a summary, said so), grouped
    skips, notes and warnings (each once). The full list is the JSON report."""
    from surgery.report.checks import group_skips

    rows = sorted(res.modules, key=lambda m: -m.rel_error)
    shown = rows if top is None else rows[:top]
    lines = [table(
        [[m.module, m.kind, "x".join(str(d) for d in m.shape), f"{m.rows} rows" if m.method == "rows" else m.rank,
          human_count(m.params),
          f"{m.rel_change:.2e}", f"{m.rel_error:.4f}", f"{100 * m.energy_kept:.2f}"] for m in shown],
        EXTRACT_HEADERS, "lllrrrrr")]
    more = shown_line(len(shown), len(rows), "modules", "worst relative error first")
    if more:
        lines.append(more)
    share = 100 * (res.adapter_params + res.full_params) / max(res.model_params, 1)
    lines.append(
        f"{_module_counts(res)}, {human_count(res.adapter_params)} adapter params"
        f" + {human_count(res.full_params)} saved whole ({len(res.full)} tensors) = {share:.2f}% of the model;"
        f" overall relative error {res.overall_rel_error:.4f}; {res.seconds:.1f} s"
    )
    lines += group_skips(res.skipped)
    if res.left_out_share:
        lines.append(f"left out: {100 * res.left_out_share:.2f}% of the delta (|d_skipped|^2 / |d|^2)")
    lines += note_lines(res.notes, ctx)
    lines += warning_lines(res.warnings, ctx)
    return "\n".join(lines)


_REFINE_FIELDS = ("calibration", "steps", "lr", "warmup", "batch_size", "max_length", "objective", "holdout",
                  "eval_every", "weights", "layers", "train_vectors", "patience")


def _run_refine(base, ft, out, opts: ExtractOptions, ropts, prog):
    """extract_lora into a temporary directory, then refine with FT as the teacher (surgery.ops.refine)."""
    from surgery.io.hub import resolve_model
    from surgery.ops.extract import extract_lora
    from surgery.ops.refine import extract_and_refine

    ex = opts.replace(overwrite=False)  # Hub ids: extract records the id, refine reads the cached snapshot
    rbase, rft = resolve_model(base, opts.revision), resolve_model(ft, opts.revision)
    return extract_and_refine(rbase, rft, out, ropts, progress=prog,
                              extract=lambda tmp: extract_lora(base, ft, tmp, ex, progress=prog))


@cli.command("extract-lora")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("ft", type=click.Path(path_type=str))
@out_option(help="Adapter directory to write.")
@click.option("--rank", type=int, help="Fixed rank for every module (default 16).")
@click.option("--energy", type=float, help="Smallest rank keeping this fraction of each delta's energy, in (0, 1].")
@click.option("--budget", help="Total LoRA parameters spread over all modules: a count (2e6), a share of the "
              "model (1%), or rN: as many as rank N on every module would take (e.g. r8).")
@click.option("--svd", type=click.Choice(SVD_METHODS), default="auto", show_default=True)
@click.option("--niter", type=int, default=4, show_default=True, help="Power iterations (randomized SVD).")
@click.option("--max-rank", type=int, help="Rank cap for --energy/--budget (default 256 unless --svd exact).")
@click.option("--include", multiple=True, metavar="REGEX", help="Only modules matching this regex (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip modules matching this regex (repeatable).")
@click.option("--embeddings", type=click.Choice(EMBEDDING_MODES), default="lora", show_default=True,
              help="A changed embedding as LoRA, as its most changed rows (PEFT trainable tokens: as many as "
                   "rank N's parameters buy), whole, or skipped.")
@click.option("--revision", help="Hub revision (branch, tag, commit) for BASE / FT given as Hub ids (from the cache).")
@click.option("--other-deltas", type=click.Choice(OTHER_DELTA_MODES),
              help="Norm deltas: saved whole (modules_to_save) or skipped. [default: full; skip with --serving-safe]")
@click.option("--bias", type=click.Choice(BIAS_MODES), default="auto", show_default=True,
              help="Bias deltas: lora_B.bias (lora), the fine-tune's biases with PEFT bias='all' (all), skipped, "
              "or auto: lora unless an embedding/expert LoRA forbids it, then all.")
@click.option("--serving-safe", is_flag=True,
              help="No modules_to_save (some servers reject it): norm deltas skipped, embeddings never saved whole.")
@dtype_option(help="Adapter dtype (default: the base's).")
@device_option()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--task-type", help="PEFT task_type to record, e.g. CAUSAL_LM (default: inferred from config.json's "
              "architectures; null when unknown).")
@click.option("--report", type=click.Path(path_type=str), help="Write the full report as JSON here.")
@plot_option("a layer x module heatmap of each module's relative error and energy kept")
@overwrite_option("an existing output directory (and --report / --plot file)")
@json_option(help="Print the report as JSON on stdout.")
@quiet_option()
@threads_option()
@click.option("--refine", is_flag=True, help="Then train the factors to match FT's outputs on --calibration text.")
@refine_flags(prefix=True)
@click.pass_context
def extract_cmd(ctx, base, ft, out, report, plot, as_json, quiet, refine, **fields):
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
    opts = build_options(ExtractOptions, ctx, **{k: v for k, v in fields.items() if k not in _REFINE_FIELDS})
    if fields["calibration"] is not None and not refine:
        raise click.UsageError("--calibration is used by --refine; add --refine", ctx=ctx)
    if report:
        from surgery.io import check_report_path

        check_report_path(report, [Path(base), Path(ft)], opts.overwrite)
    check_plot(plot, opts.overwrite, [base, ft], ctx)
    ropts = build_refine_options(ctx) if refine else None  # usage errors (exit 2) before any work
    ref = None
    with progress_bar(not quiet) as prog:
        if refine:
            res, ref = _run_refine(base, ft, out, opts, ropts, prog)
        else:
            from surgery.ops.extract import extract_lora

            res = extract_lora(base, ft, out, opts, progress=prog)
    data = res.to_json() if ref is None else {**res.to_json(), "refine": ref.to_json()}
    if report:
        from surgery.io import write_text_atomic

        write_text_atomic(report, json.dumps(data, indent=2) + "\n")
    if plot:
        from surgery.report.plots import plot_extract

        plot_extract(res, plot, inputs=[base, ft], overwrite=opts.overwrite)
    if as_json:
        echo_json(data)
        return
    # -q only drops the progress bar: the report table stays on stderr (tests/test_refine.py relies on it)
    click.echo(render_extract(res, ctx=ctx), err=True)
    if ref is not None:
        click.echo(render_refine(ref, ctx=ctx), err=True)
    click.echo(f"wrote {out}: {_module_counts(res)}, overall relative error {res.overall_rel_error:.4f}")
