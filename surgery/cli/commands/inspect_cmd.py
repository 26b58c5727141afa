"""surgery inspect: read a checkpoint's headers, render the summary.

Imported when the CLI starts: nothing heavy at the top (surgery.ops.inspect pulls in torch
through surgery.io, so it is imported when the command runs).
"""

from __future__ import annotations

import click

from ..main import cli
from ..util import echo_json, human_bytes, human_count, json_option, table


def render_inspect(info) -> str:
    """The text report of an InspectResult (names and config values from the checkpoint escaped)."""
    from surgery.io import escape_name

    dtypes = ", ".join(f"{k} {human_bytes(v)}" for k, v in info.bytes_by_dtype.items())
    lines = [f"{escape_name(info.path)}: {info.kind} ({info.format}, {len(info.shards)} shard(s))"]
    if info.what:
        lines.append(f"  what: {escape_name(info.what, 400)}")
    if info.kind == "onnx-export":
        lines += [f"  {k}: {escape_name(v, 200)}" for k, v in info.details.items() if v is not None and k != "files"]
        lines.append(f"  files: {', '.join(info.shards)} ({human_bytes(info.bytes)})")
        return "\n".join(lines)
    lines += [f"  tensors {info.tensor_count}, parameters {human_count(info.parameters)} "
             f"({info.parameters:,}), {human_bytes(info.bytes)}: {dtypes}"]
    lines += [f"  {k}: {escape_name(v, 200)}" for k, v in info.config.items()]
    lines += [f"  tied: {escape_name(head, 200)} is not stored; it shares {escape_name(src, 200)} (tie_word_embeddings)"
              for head, src in info.tied.items()]
    rows = [[g["name"], str(tuple(g["shape"])), g["dtype"], g["count"], human_count(g["params"])]
            for g in info.groups]
    lines.append(table(rows, ["tensor", "shape", "dtype", "n", "params"], "lllrr"))
    return "\n".join(lines)


@cli.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@json_option(help="Full machine-readable listing on stdout.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """What is in a checkpoint, read from headers only (no tensor data).

    PATH is a .safetensors/.bin/.pt file, a Hugging Face model directory
    (single or sharded) or a PEFT adapter directory.

    \b
    Examples:
      surgery inspect fixtures/tiny-llama
      surgery inspect fixtures/tiny-llama-lora --json
    """
    from surgery.ops.inspect import inspect_checkpoint

    info = inspect_checkpoint(path)
    if as_json:
        echo_json(info.to_json())
    else:
        click.echo(render_inspect(info))
