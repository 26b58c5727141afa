"""surgery init-lora / surgery init-adapter: parse the flags into options, call the library, render."""

from __future__ import annotations

import click

from surgery.options.base import DTYPE_CHOICES
from surgery.options.init import (
    ACTIVATION_NAMES,
    INIT_METHODS,
    PLACEMENTS,
    SVD_METHODS,
    InitAdapterOptions,
    InitLoraOptions,
)

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
)

_LORA = InitLoraOptions(rank=1)  # the library's defaults, shown in --help
_ADAPTER = InitAdapterOptions(bottleneck=1)


def render_init_lora(res) -> tuple[str, str]:
    """(report for stderr, summary line for stdout) of an InitResult."""
    from surgery.io import escape_name

    worst = sorted(res.modules, key=lambda m: -m.rel_error)[:10]
    lines = [table([[m.module, m.kind, f"{m.shape[0]}x{m.shape[1]}", m.rank, f"{m.rel_residual:.4f}",
                     f"{m.rel_error:.2e}"] for m in worst],
                   ["module", "kind", "shape", "rank", "|W_res|/|W|", "recon err"], "lllrrr")]
    lines += [f"skipped {escape_name(s['tensor'], 200)}: {s['why']}" for s in res.skipped]
    out = escape_name(res.out)
    summary = (f"wrote {out}/adapter and {out}/residual: {res.method}, {len(res.modules)} modules, rank "
               f"{res.rank}, alpha {res.alpha:g}, {human_count(res.adapter_params)} LoRA params; max relative "
               f"reconstruction error {res.max_rel_error:.2e} (residual {res.residual_dtype}, adapter "
               f"{res.adapter_dtype})")
    return "\n".join(lines), summary


@cli.command("init-lora")
@click.argument("model", type=click.Path(path_type=str))
@out_option(help="Output directory: OUT/adapter (PEFT) and OUT/residual (model).")
@click.option("--rank", type=int, required=True, help="LoRA rank r.")
@click.option("--method", type=click.Choice(INIT_METHODS), default=_LORA.method, show_default=True,
              help="pissa: top-r singular triplets; milora: bottom-r; olora: QR.")
@click.option("--alpha", type=float, help="lora_alpha (default: the rank, scale 1).")
@click.option("--niter", type=int, default=_LORA.niter, show_default=True,
              help="Power iterations (randomized SVD, pissa).")
@click.option("--svd", type=click.Choice(SVD_METHODS), default=_LORA.svd, show_default=True,
              help="SVD engine for pissa.")
@click.option("--oversample", type=int, help="Extra range-finder columns (randomized SVD; default max(10, r/4)).")
@click.option("--include", multiple=True, metavar="REGEX", help="Only modules matching this regex (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip modules matching this regex (repeatable).")
@click.option("--adapter-dtype", type=click.Choice(DTYPE_CHOICES), default=_LORA.adapter_dtype, show_default=True,
              help="dtype of the LoRA factors (the residual keeps the model's dtype).")
@click.option("--shard-size", type=SizeType(),
              help="Residual shard size limit (default: the input's largest shard, 5GB for one file).")
@click.option("--seed", type=int, default=_LORA.seed, show_default=True, help="Seed of the randomized SVD.")
@overwrite_option("an existing output directory")
@json_option(help="Print the report as JSON on stdout.")
@quiet_option()
@device_option(help="Where the SVDs / QRs run: auto = cuda when one is available, else cpu.")
@threads_option()
@click.pass_context
def init_lora_cmd(ctx, model, as_json, quiet, **fields):
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
    out = fields.pop("out")
    opts = build_options(InitLoraOptions, ctx, **fields)
    from surgery.ops.init_lora import init_lora

    with progress_bar(not quiet) as prog:
        res = init_lora(model, out, opts, progress=prog)
    if as_json:
        echo_json(res.to_json())
        return
    report, summary = render_init_lora(res)
    if not quiet:
        click.echo(report, err=True)
    click.echo(summary)


def render_init_adapter(res) -> tuple[str, str]:
    """(report for stderr, summary line for stdout) of a BottleneckResult."""
    from surgery.io import escape_name

    delta = res.init == "delta"
    rows = [[m.module, m.site, m.dim, m.bottleneck, human_count(m.params), f"{100 * m.top_energy:.1f}%"]
            + ([f"{100 * m.captured:.1f}%"] if m.captured is not None else []) for m in res.modules]
    head = ["module", "site", "d", "R", "params", "W energy in top-R"] + (["delta captured"] if delta else [])
    lines = [table(rows, head, "llrrrr" + ("r" if delta else ""))]
    lines += [f"note: {escape_name(n)}" for n in res.notes]
    cap = f"; delta captured {100 * res.captured:.1f}%" if res.captured is not None else ""
    summary = (f"wrote {escape_name(res.out)}: {len(res.modules)} bottleneck adapters (R={res.bottleneck}, "
               f"{res.activation}), "
               f"{human_count(res.trainable_params)} trainable params "
               f"({100 * res.trainable_params / max(res.model_params, 1):.2f}% of the model){cap}")
    return "\n".join(lines), summary


@cli.command("init-adapter")
@click.argument("model", type=click.Path(path_type=str))
@out_option(help="Adapter directory to write.")
@click.option("--bottleneck", type=int, required=True, help="Bottleneck width R.")
@click.option("--placement", type=click.Choice(PLACEMENTS), default=_ADAPTER.placement, show_default=True,
              help="After the FFN output projection, the attention output projection, or both.")
@click.option("--modules", metavar="REGEX", help="Regex naming the output projections instead of --placement.")
@click.option("--from-delta", nargs=2, type=click.Path(path_type=str), metavar="BASE FT",
              help="Initialise from the SVD of the fine-tune's delta instead (reports how much it captures).")
@click.option("--activation", type=click.Choice(ACTIVATION_NAMES), default=_ADAPTER.activation, show_default=True)
@click.option("--include", multiple=True, metavar="REGEX", help="Only modules matching this regex (repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Skip modules matching this regex (repeatable).")
@overwrite_option("an existing output directory")
@json_option(help="Print the report as JSON on stdout.")
@quiet_option()
@device_option(help="Where the SVDs run: auto = cuda when one is available, else cpu.")
@threads_option()
@click.pass_context
def init_adapter_cmd(ctx, model, as_json, quiet, **fields):
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
    out = fields.pop("out")
    fields["from_delta"] = tuple(fields["from_delta"]) if fields["from_delta"] else None
    opts = build_options(InitAdapterOptions, ctx, **fields)
    from surgery.ops.bottleneck import init_adapter

    with progress_bar(not quiet) as prog:
        res = init_adapter(model, out, opts, progress=prog)
    if as_json:
        echo_json(res.to_json())
        return
    report, summary = render_init_adapter(res)
    if not quiet:
        click.echo(report, err=True)
    click.echo(summary)
