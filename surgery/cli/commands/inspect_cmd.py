"""surgery inspect"""

from __future__ import annotations

import click

from surgery.ops.inspect import inspect_checkpoint

from ..main import cli
from ..util import echo_json, human_bytes, human_count, table


@cli.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Full machine-readable listing on stdout.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """What is in a checkpoint, read from headers only (no tensor data).

    PATH is a .safetensors/.bin/.pt file, a Hugging Face model directory
    (single or sharded) or a PEFT adapter directory.

    \b
    Examples:
      surgery inspect fixtures/tiny-llama
      surgery inspect fixtures/tiny-llama-lora --json
    """
    info = inspect_checkpoint(path)
    if as_json:
        echo_json(info)
        return
    dtypes = ", ".join(f"{k} {human_bytes(v)}" for k, v in info["bytes_by_dtype"].items())
    click.echo(f"{info['path']}: {info['kind']} ({info['format']}, {len(info['shards'])} shard(s))")
    click.echo(f"  tensors {info['tensor_count']}, parameters {human_count(info['parameters'])} "
               f"({info['parameters']:,}), {human_bytes(info['bytes'])}: {dtypes}")
    for k, v in info["config"].items():
        click.echo(f"  {k}: {v}")
    for head, src in info["tied"].items():
        click.echo(f"  tied: {head} is not stored; it shares {src} (tie_word_embeddings)")
    rows = [[g["name"], str(tuple(g["shape"])), g["dtype"], g["count"], human_count(g["params"])]
            for g in info["groups"]]
    click.echo(table(rows, ["tensor", "shape", "dtype", "n", "params"], "lllrr"))
