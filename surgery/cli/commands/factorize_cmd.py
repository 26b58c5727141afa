"""surgery factorize: parse the flags into FactorizeOptions, call the library, render."""

from __future__ import annotations

import click

from surgery.options.factorize import FactorizeOptions

from ..main import cli
from ..util import (
    SizeType,
    build_options,
    device_option,
    echo_json,
    human_count,
    json_option,
    out_option,
    overwrite_option,
    progress_bar,
    quiet_option,
    table,
    threads_option,
    warning_lines,
)

_DEFAULTS = FactorizeOptions(rank=1)  # the library's defaults, shown in --help


def _check_line(oc) -> str:
    from surgery.io import escape_name

    if oc is None:
        return "output check skipped (--no-check)"
    if "skipped" in oc:
        return f"output check skipped ({escape_name(oc['skipped'])})"
    return (f"last hidden state on {oc['inputs']}: max abs diff {oc['max_abs_diff']:.3g} "
            f"(|ref| max {oc['ref_max_abs']:.3g}), cosine mean {oc['cosine_mean']:.5f} min {oc['cosine_min']:.5f}")


def render_factorize(res, ctx: click.Context | None = None) -> tuple[str, str]:
    """(report for stderr, summary line for stdout) of a FactorizeResult; warnings end the report."""
    from surgery.io import escape_name

    lines = [table([[m.module, m.kind, f"{m.shape[0]}x{m.shape[1]}", m.rank,
                     f"{100 * (1 - m.params_after / m.params_before):.1f}", f"{m.rel_error:.4f}",
                     f"{100 * m.energy_kept:.2f}"] for m in res.modules],
                   ["module", "kind", "shape (out x in)", "rank", "params saved (%)", "rel. error |W-BA|/|W|",
                    "energy kept (%)"], "lllrrrr")]
    lines += [f"kept dense {escape_name(s['module'], 200)}: {s['why']}" for s in res.skipped]
    lines += warning_lines(res.warnings, ctx)
    summary = (f"wrote {escape_name(res.out)}: {len(res.modules)} layers factorised, parameters "
               f"{human_count(res.params_before)} -> {human_count(res.params_after)} "
               f"(saved {human_count(res.params_saved)}, {100 * res.params_saved / max(res.params_before, 1):.1f}%); "
               f"{_check_line(res.output_check)}")
    return "\n".join(lines), summary


@cli.command("factorize")
@click.argument("model", type=click.Path(path_type=str))
@out_option(help="Output model directory.")
@click.option("--rank", type=int, help="Rank of every factorised layer.")
@click.option("--energy", type=float, help="Smallest rank keeping this share of ‖W‖², in (0, 1].")
@click.option("--min-savings", type=float, default=_DEFAULTS.min_savings, show_default=True,
              help="Factorise a layer only where r·(out+in) saves at least this share of out·in.")
@click.option("--max-rank", type=int, default=_DEFAULTS.max_rank, show_default=True,
              help="Rank cap for --energy on layers large enough for the randomized SVD.")
@click.option("--include", multiple=True, metavar="REGEX", help="Only modules matching this regex (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip modules matching this regex (repeatable).")
@click.option("--niter", type=int, default=_DEFAULTS.niter, show_default=True,
              help="Power iterations (randomized SVD).")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True, help="Seed of the randomized SVD.")
@click.option("--shard-size", type=SizeType(), default=_DEFAULTS.shard_size, show_default=True)
@click.option("--no-check", is_flag=True, help="Skip loading both models to compare outputs.")
@overwrite_option("an existing output directory")
@json_option(help="Print the report as JSON on stdout.")
@quiet_option()
@device_option(help="Where the SVDs run: auto = cuda when one is available, else cpu.")
@threads_option()
@click.pass_context
def factorize_cmd(ctx, model, no_check, as_json, quiet, **fields):
    """Replace Linear weights by two low-rank factors where that saves parameters.

    W (out x in) becomes (out x r)(r x in) from its truncated SVD. The output is a
    model directory plus factorization.json; load it in Python with
    surgery.ops.factorize.load_factorized(OUT). Reports the parameters saved and the
    last hidden state's error on sample inputs.

    \b
    Examples:
      surgery factorize fixtures/tiny-bert -o out/fact --rank 8
      surgery factorize model/ -o out/fact --energy 0.95 --include intermediate --min-savings 0.3
    """
    out = fields.pop("out")
    opts = build_options(FactorizeOptions, ctx, evaluate=not no_check, **fields)
    from surgery.ops.factorize import factorize

    with progress_bar(not quiet) as prog:
        res = factorize(model, out, opts, progress=prog)
    if as_json:
        echo_json(res.to_json())
        return
    report, summary = render_factorize(res, ctx)
    if not quiet:
        click.echo(report, err=True)
    elif res.warnings:  # -q drops the table, never a warning
        click.echo("\n".join(warning_lines(res.warnings, ctx)), err=True)
    click.echo(summary)
