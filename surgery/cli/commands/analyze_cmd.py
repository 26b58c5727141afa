"""surgery analyze: parse the flags into AnalyzeOptions, call the library, render."""

from __future__ import annotations

import click

from surgery.options.analyze import DEFAULT_RANKS, EXACT_MAX, RANDOMIZED_CAP, AnalyzeOptions

from ..main import cli
from ..util import (
    build_options,
    check_plot,
    device_option,
    echo_json,
    human_count,
    json_option,
    overwrite_option,
    plot_option,
    progress_bar,
    quiet_option,
    table,
    threads_option,
)


class RanksType(click.ParamType):
    """'8,16,32,64' -> (8, 16, 32, 64); text that is not a list of integers is a usage error (exit 2).

    Which ranks are allowed is AnalyzeOptions' rule."""

    name = "ranks"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        try:
            return tuple(int(x) for x in str(value).split(",") if x.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of ranks, e.g. 8,16,32,64", param, ctx)


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def _r(v, k) -> str:
    return f">{k}" if v is None else str(v)


def _weight_table(res) -> str:
    rk = res.ranks
    rows = [[m.module, m.kind, f"{m.weight.shape[0]}x{m.weight.shape[1]}", f"{m.weight.norm:.3g}",
             f"{m.weight.stable_rank:.1f}",
             ("" if m.weight.spectrum_complete else "~") + f"{m.weight.effective_rank:.1f}",
             *[_pct(m.weight.energy[r]) for r in rk]] for m in res.modules]
    head = ["module", "kind", "shape", "|W|_F", "stable rank", "eff. rank", *[f"kept r={r} (%)" for r in rk]]
    return table(rows, head, "lllrrr" + "r" * len(rk))


def _delta_table(res) -> str:
    rk = res.ranks
    rows = []
    for m in res.modules:
        d = m.delta
        row = [m.module, f"{d.shape[0]}x{d.shape[1]}", f"{m.rel_change:.2e}", f"{d.stable_rank:.1f}",
               ("" if d.spectrum_complete else "~") + f"{d.effective_rank:.1f}",
               *[_pct(d.energy[r]) for r in rk],
               *[_r(d.rank_for_energy[e], d.k) for e in ("0.9", "0.95", "0.99")]]
        if res.budget is not None:
            row.append(m.recommended_rank)
        rows.append(row)
    head = ["module", "shape", "|d|/|W|", "d stable rank", "d eff. rank", *[f"d kept r={r} (%)" for r in rk],
            "r for 90%", "r for 95%", "r for 99%"] + (["recommended r"] if res.budget is not None else [])
    return table(rows, head, "llrrr" + "r" * (len(rk) + 3 + (res.budget is not None)))


def render_analyze(res) -> str:
    """The text report of an AnalyzeResult: one table (weights, or the delta with a BASE)."""
    lines = [_weight_table(res) if res.base is None else _delta_table(res)]
    if res.base is not None and res.budget is not None:
        lines.append(f"recommended ranks: budget {human_count(res.budget)} params, used "
                     f"{human_count(res.budget_used)} ({100 * res.budget_used / max(res.model_params, 1):.2f}% "
                     "of the model), same allocator as extract-lora --budget")
    from surgery.io import escape_name

    lines += [f"skipped {escape_name(sk['tensor'], 200)}: {sk['why']}" for sk in res.skipped]
    what = "delta" if res.base is not None else "weight"
    lines.append(f"{len(res.modules)} matrices. 'kept r=N (%)': share of the {what}'s energy (squared Frobenius "
                 "norm) its top-N singular values keep; stable rank |M|_F^2/s1^2; eff. rank: Roy & Vetterli (2007)")
    approx = any(not (m.delta or m.weight).spectrum_complete for m in res.modules)
    lines.append("SVD: exact for small matrices, randomized top-k for large ones" + (
        "; '~': from the top-k singular values only" if approx else "") + " (the policy: method_note in --json)")
    return "\n".join(lines)


@cli.command("analyze")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--base", type=click.Path(path_type=str), help="Base model: also analyse the delta MODEL - BASE.")
@click.option("--ranks", type=RanksType(), default=",".join(map(str, DEFAULT_RANKS)), show_default=True,
              help="Ranks at which to report the energy kept.")
@click.option("--budget", help="With --base: recommend a rank per module for this many LoRA parameters (2e6, 1%, "
              "or r8: what rank 8 on every changed module would take).")
@click.option("--include", multiple=True, metavar="REGEX", help="Only modules matching this regex (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip modules matching this regex (repeatable).")
@click.option("--exact-max", type=int, default=EXACT_MAX, show_default=True,
              help="Exact SVD when min(m, n) is at most this, randomized otherwise.")
@click.option("--cap", type=int, default=RANDOMIZED_CAP, show_default=True,
              help="Singular values computed by the randomized SVD.")
@click.option("--niter", type=int, default=4, show_default=True, help="Power iterations (randomized SVD).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@plot_option("the singular values and the energy kept per rank, one panel pair per layer type")
@overwrite_option("an existing --plot file")
@json_option(help="Print the full result (spectra included) as JSON.")
@quiet_option()
@device_option()
@threads_option()
@click.pass_context
def analyze_cmd(ctx, model, base, plot, overwrite, as_json, quiet, **fields):
    """Spectra of every matrix of MODEL (and of the delta MODEL - BASE).

    Per layer: norm, stable rank, effective rank, energy kept at each rank; with
    --base, the same for the delta plus its relative size, the ranks keeping
    90/95/99% of its energy and (--budget) a recommended rank per module.

    \b
    Examples:
      surgery analyze fixtures/tiny-bert
      surgery analyze fixtures/tiny-bert-ft --base fixtures/tiny-bert --budget 5%
      surgery analyze ft/ --base base/ --ranks 4,8,16 --plot spectra.png --json > report.json
    """
    opts = build_options(AnalyzeOptions, ctx, **fields)
    from surgery.io import escape_name
    from surgery.ops.analyze import analyze, plot_spectra

    check_plot(plot, overwrite, [model, base], ctx)  # fail before the SVDs, not after; never into MODEL or BASE
    with progress_bar(not quiet) as prog:
        res = analyze(model, base, opts, progress=prog)
    if plot:
        plot_spectra(res, plot, overwrite=overwrite)
    if as_json:
        echo_json(res.to_json())
    else:
        click.echo(render_analyze(res))
        if plot:
            click.echo(f"wrote {escape_name(plot)}")
