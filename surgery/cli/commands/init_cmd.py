"""surgery init-lora / surgery init-adapter"""

from __future__ import annotations

import click

from surgery.ops.bottleneck import ACTIVATIONS, init_adapter
from surgery.ops.init_lora import init_lora

from ..main import cli
from ..util import RegexType, SizeType, echo_json, human_count, progress_bar, table


@cli.command("init-lora")
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str),
              help="Output directory: OUT/adapter (PEFT) and OUT/residual (model).")
@click.option("--rank", required=True, type=click.IntRange(min=1), help="LoRA rank r.")
@click.option("--method", type=click.Choice(["pissa", "milora", "olora"]), default="pissa", show_default=True,
              help="pissa: top-r singular triplets; milora: bottom-r; olora: QR.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), help="lora_alpha (default: the rank, scale 1).")
@click.option("--niter", type=click.IntRange(min=0), default=4, show_default=True, help="Power iterations (randomized SVD, pissa).")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="SVD engine for pissa.")
@click.option("--include", multiple=True, type=RegexType(), help="Only modules matching this regex (repeatable).")
@click.option("--exclude", multiple=True, type=RegexType(), help="Skip modules matching this regex (repeatable).")
@click.option("--adapter-dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="dtype of the LoRA factors (the residual keeps the model's dtype).")
@click.option("--shard-size", type=SizeType(), help="Residual shard size limit (default: the input's largest shard, 5GB for one file).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def init_lora_cmd(model, out, rank, method, alpha, niter, svd, include, exclude, adapter_dtype, shard_size, seed,
                  overwrite, as_json, quiet):
    """Initialise a LoRA adapter from MODEL's own weights (PiSSA / MiLoRA / OLoRA).

    Writes OUT/adapter (a PEFT adapter) and OUT/residual (MODEL with the adapter's
    part subtracted), so PeftModel.from_pretrained(residual, adapter) computes
    MODEL exactly at initialisation; factor scaling follows PEFT's
    init_lora_weights="pissa" / "olora".

    \b
    Examples:
      surgery init-lora fixtures/tiny-bert -o out/pissa --rank 4
      surgery init-lora model/ -o out/olora --rank 16 --method olora --alpha 32 --exclude lm_head
    """
    with progress_bar(not quiet) as prog:
        res = init_lora(model, out, rank=rank, method=method, alpha=alpha, niter=niter, svd=svd, include=include,
                        exclude=exclude, seed=seed, adapter_dtype=adapter_dtype, shard_size=shard_size,
                        overwrite=overwrite, progress=prog)
    if as_json:
        echo_json(res.to_json())
        return
    worst = sorted(res.modules, key=lambda m: -m.rel_error)[:10]
    click.echo(table([[m.module, m.kind, f"{m.shape[0]}x{m.shape[1]}", m.rank, f"{m.rel_residual:.4f}",
                       f"{m.rel_error:.2e}"] for m in worst],
                     ["module", "kind", "shape", "rank", "|W_res|/|W|", "recon err"], "lllrrr"), err=True)
    for s in res.skipped:
        click.echo(f"skipped {s['tensor']}: {s['why']}", err=True)
    click.echo(f"wrote {out}/adapter and {out}/residual: {res.method}, {len(res.modules)} modules, rank {res.rank}, "
               f"alpha {res.alpha:g}, {human_count(res.adapter_params)} LoRA params; max relative reconstruction "
               f"error {res.max_rel_error:.2e} (residual {res.residual_dtype}, adapter {res.adapter_dtype})")


@cli.command("init-adapter")
@click.argument("model", type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Adapter directory to write.")
@click.option("--bottleneck", required=True, type=click.IntRange(min=1), help="Bottleneck width R.")
@click.option("--placement", type=click.Choice(["ffn", "attn", "both"]), default="ffn", show_default=True,
              help="After the FFN output projection, the attention output projection, or both.")
@click.option("--modules", "modules", type=RegexType(), help="Regex naming the output projections instead of --placement.")
@click.option("--from-delta", nargs=2, type=click.Path(path_type=str), metavar="BASE FT",
              help="Initialise from the SVD of the fine-tune's delta instead (reports how much it captures).")
@click.option("--activation", type=click.Choice(list(ACTIVATIONS)), default="gelu", show_default=True)
@click.option("--include", multiple=True, type=RegexType(), help="Only modules matching this regex (repeatable).")
@click.option("--exclude", multiple=True, type=RegexType(), help="Skip modules matching this regex (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def init_adapter_cmd(model, out, bottleneck, placement, modules, from_delta, activation, include, exclude, overwrite,
                     as_json, quiet):
    """Serial bottleneck adapters (Houlsby) after MODEL's sub-layers, SVD-initialised.

    down = top-R left singular vectors of the sub-layer's output projection, up = 0:
    the model is unchanged at initialisation. With --from-delta BASE FT, down/up
    come from the SVD of the fine-tune's delta instead. Attach in Python with
    surgery.ops.bottleneck.attach_bottleneck(model, OUT).

    \b
    Examples:
      surgery init-adapter fixtures/tiny-bert -o out/adapters --bottleneck 8 --placement both
      surgery init-adapter base/ -o out/ad --bottleneck 16 --from-delta base/ ft/ --activation identity
    """
    with progress_bar(not quiet) as prog:
        res = init_adapter(model, out, bottleneck=bottleneck, placement=placement, modules=modules,
                           from_delta=tuple(from_delta) if from_delta else None, activation=activation,
                           include=include, exclude=exclude, overwrite=overwrite, progress=prog)
    if as_json:
        echo_json(res.to_json())
        return
    rows = [[m.module, m.site, m.dim, m.bottleneck, human_count(m.params), f"{100 * m.top_energy:.1f}%"]
            + ([f"{100 * m.captured:.1f}%"] if m.captured is not None else []) for m in res.modules]
    head = ["module", "site", "d", "R", "params", "W energy in top-R"] + (["delta captured"] if res.init == "delta" else [])
    click.echo(table(rows, head, "llrrrr" + ("r" if res.init == "delta" else "")), err=True)
    for n in res.notes:
        click.echo(f"note: {n}", err=True)
    cap = f"; delta captured {100 * res.captured:.1f}%" if res.captured is not None else ""
    click.echo(f"wrote {out}: {len(res.modules)} bottleneck adapters (R={res.bottleneck}, {res.activation}), "
               f"{human_count(res.trainable_params)} trainable params "
               f"({100 * res.trainable_params / max(res.model_params, 1):.2f}% of the model){cap}")
