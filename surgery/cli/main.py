"""`surgery`: the command-line front-end. One error boundary lives here."""

from __future__ import annotations


import click

from surgery import __version__
from surgery.errors import SurgeryError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class SurgeryGroup(click.Group):
    """Turns library errors into one line on stderr and an exit code.

    SurgeryError (bad input, failed validation) -> exit 1; click usage errors
    -> exit 2 (click's own handling); anything else is a bug -> one line asking
    for --debug, exit 1. --debug re-raises so the traceback shows.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except SurgeryError as e:
            if ctx.meta.get("surgery.debug"):
                raise
            click.echo(f"error: {_one_line(e)}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; no output was written", err=True)
            ctx.exit(130)
        except MemoryError:
            if ctx.meta.get("surgery.debug"):
                raise
            click.echo("error: out of memory; try a smaller --shard-size or fewer tensors in flight", err=True)
            ctx.exit(1)
        except Exception as e:  # noqa: BLE001 - the boundary: a traceback only with --debug
            if ctx.meta.get("surgery.debug"):
                raise
            click.echo(f"error: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback and report it)", err=True)
            ctx.exit(1)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@click.group(cls=SurgeryGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="surgery")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Model surgery for PyTorch / Hugging Face checkpoints.

    \b
    Examples:
      surgery inspect fixtures/tiny-llama
      surgery extract-lora fixtures/tiny-bert fixtures/tiny-bert-ft -o out/lora --rank 4
      surgery merge fixtures/tiny-bert out/lora -o out/merged
      surgery export-onnx out/merged -o out/onnx
      surgery demo
    """
    ctx.meta["surgery.debug"] = debug


def main() -> None:
    cli(prog_name="surgery")


from . import commands  # noqa: E402,F401  (each module adds its commands to `cli`)


if __name__ == "__main__":  # pragma: no cover
    main()
