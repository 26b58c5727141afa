"""surgery merge"""

from __future__ import annotations

import math

import click

from ..main import cli
from ..util import SizeType, echo_json, human_bytes, progress_bar


def _check_weight(ctx, param, value):
    for w in value:
        if not math.isfinite(w):
            raise click.BadParameter(f"{w} is not a finite number", ctx=ctx, param=param)
    return value


@cli.command("merge")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Output model directory.")
@click.option("--weight", "weights", multiple=True, type=float, callback=_check_weight,
              help="Weight of each adapter, in order (repeat once per adapter; default 1.0).")
@click.option("--unmerge", is_flag=True, help="Subtract the adapters instead of adding them.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]),
              help="Output dtype of floating tensors (default: each tensor keeps its own).")
@click.option("--shard-size", type=SizeType(), help="Max shard size, e.g. 5GB (default: as the base's largest shard).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the deltas are computed.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result on stdout.")
def merge_cmd(base, adapters, out, weights, unmerge, dtype, shard_size, device, overwrite, as_json) -> None:
    """Fold LoRA adapters into a base model (or out of it with --unmerge).

    BASE is a Hugging Face model directory or weights file; each ADAPTER is a PEFT
    LoRA adapter directory (written by PEFT or `surgery extract-lora`). The result
    is written shard by shard, atomically, with the base's config and tokenizer.

    \b
    Examples:
      surgery merge fixtures/tiny-llama fixtures/tiny-llama-lora -o out/merged
      surgery merge base/ lora-a/ lora-b/ --weight 0.7 --weight 0.3 -o out/mix --dtype bf16
      surgery merge out/merged fixtures/tiny-llama-lora --unmerge -o out/base-again
    """
    from surgery.ops.merge import merge

    if weights and len(weights) != len(adapters):
        raise click.UsageError(f"{len(weights)} --weight value(s) for {len(adapters)} adapter(s); "
                               f"give one --weight per adapter or none")
    with progress_bar() as progress:
        res = merge(base, list(adapters), out, weights=list(weights) or None, unmerge=unmerge, dtype=dtype,
                    shard_size=shard_size, device=device, overwrite=overwrite, progress=progress)
    if as_json:
        echo_json(res.to_dict())
        return
    verb = "unmerged" if unmerge else "merged"
    click.echo(f"{verb} {len(res.adapters)} adapter(s) {'from' if unmerge else 'into'} {base} -> {res.out}")
    for a in res.adapters:
        kind = "DoRA" if a.dora else ("rsLoRA" if a.rslora else "LoRA")
        full = f", {len(a.replaced)} full tensor(s)" if a.replaced else ""
        click.echo(f"  {a.path}  weight {a.weight:g}  {kind}, {a.modules} module(s){full}")
    click.echo(f"  {len(res.changed)} of {res.tensors} tensors changed, {res.shards} shard(s), "
               f"{human_bytes(res.bytes)}, dtype {res.dtype or 'as base'}, {res.seconds:.2f} s")
    if res.vocab_size is not None:
        click.echo(f"  vocab_size -> {res.vocab_size}")
    for note in res.notes:
        click.echo(f"  note: {note}")
