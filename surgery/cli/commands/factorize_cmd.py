"""surgery factorize"""

from __future__ import annotations

import click

from surgery.ops.factorize import factorize

from ..main import cli
from ..util import RegexType, SizeType, echo_json, human_count, progress_bar, table


@cli.command("factorize")
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Output model directory.")
@click.option("--rank", type=click.IntRange(min=1), help="Rank of every factorised layer.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Smallest rank keeping this share of ‖W‖².")
@click.option("--min-savings", type=click.FloatRange(0, 1, max_open=True), default=0.2, show_default=True,
              help="Factorise a layer only where r·(out+in) saves at least this share of out·in.")
@click.option("--max-rank", type=click.IntRange(min=1), default=256, show_default=True,
              help="Rank cap for --energy on layers large enough for the randomized SVD.")
@click.option("--include", multiple=True, type=RegexType(), help="Only modules matching this regex (repeatable).")
@click.option("--exclude", multiple=True, type=RegexType(), help="Skip modules matching this regex (repeatable).")
@click.option("--niter", type=click.IntRange(min=0), default=4, show_default=True, help="Power iterations (randomized SVD).")
@click.option("--shard-size", type=SizeType(), default="5GB", show_default=True)
@click.option("--no-check", is_flag=True, help="Skip loading both models to compare outputs.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def factorize_cmd(model, out, rank, energy, min_savings, max_rank, include, exclude, niter, shard_size, no_check,
                  overwrite, as_json, quiet):
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
    if (rank is None) == (energy is None):
        raise click.UsageError("give exactly one of --rank and --energy")
    with progress_bar(not quiet) as prog:
        res = factorize(model, out, rank=rank, energy=energy, include=include, exclude=exclude,
                        min_savings=min_savings, max_rank=max_rank, niter=niter, shard_size=shard_size,
                        evaluate=not no_check, overwrite=overwrite, progress=prog)
    if as_json:
        echo_json(res.to_json())
        return
    click.echo(table([[m.module, m.kind, f"{m.shape[0]}x{m.shape[1]}", m.rank,
                       f"{100 * (1 - m.params_after / m.params_before):.1f}%", f"{m.rel_error:.4f}",
                       f"{100 * m.energy_kept:.2f}%"] for m in res.modules],
                     ["module", "kind", "shape", "rank", "saved", "rel err", "energy"], "lllrrrr"), err=True)
    for s in res.skipped:
        click.echo(f"kept dense {s['module']}: {s['why']}", err=True)
    oc = res.output_check
    if oc is None:
        check = "output check skipped (--no-check)"
    elif "skipped" in oc:
        check = f"output check skipped ({oc['skipped']})"
    else:
        check = (f"last hidden state on {oc['inputs']}: max abs diff {oc['max_abs_diff']:.3g} "
                 f"(|ref| max {oc['ref_max_abs']:.3g}), cosine mean {oc['cosine_mean']:.5f} min {oc['cosine_min']:.5f}")
    click.echo(f"wrote {out}: {len(res.modules)} layers factorised, parameters {human_count(res.params_before)} -> "
               f"{human_count(res.params_after)} (saved {human_count(res.params_saved)}, "
               f"{100 * res.params_saved / max(res.params_before, 1):.1f}%); {check}")
