"""surgery merge"""

from __future__ import annotations

import click

from surgery.options.merge import MergeOptions

from ..main import cli
from ..util import (
    build_options,
    device_option,
    dtype_option,
    echo_json,
    human_bytes,
    json_option,
    out_option,
    overwrite_option,
    progress_bar,
    quiet_option,
    threads_option,
)


@cli.command("merge")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@out_option("Output model directory.")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight of each adapter, in order (repeat once per adapter; default 1.0).")
@click.option("--unmerge", is_flag=True, help="Subtract the adapters instead of adding them.")
@dtype_option("Output dtype of floating tensors (default: each tensor keeps its own).")
@click.option("--shard-size", metavar="SIZE", help="Max shard size, e.g. 5GB (default: as the base's largest shard).")
@device_option("Where the deltas are computed: auto = cuda when one is available, else cpu.")
@threads_option()
@overwrite_option("OUT if it exists")
@json_option()
@quiet_option()
@click.pass_context
def merge_cmd(ctx, base, adapters, out, weights, unmerge, dtype, shard_size, device, threads, overwrite, as_json,
              quiet) -> None:
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
    opts = build_options(MergeOptions.for_adapters, ctx, adapters=adapters, weights=weights, unmerge=unmerge,
                         dtype=dtype, shard_size=shard_size, device=device, threads=threads, overwrite=overwrite)
    from surgery.ops.merge import merge

    with progress_bar(enabled=not quiet) as progress:
        res = merge(base, list(adapters), out, opts, progress=progress)
    if as_json:
        echo_json(res.to_json())
    else:
        _report(res, base)


def _report(res, base: str) -> None:
    verb, prep = ("unmerged", "from") if res.unmerge else ("merged", "into")
    click.echo(f"{verb} {len(res.adapters)} adapter(s) {prep} {base} -> {res.out}")
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
