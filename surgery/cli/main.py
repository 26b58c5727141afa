"""`surgery`: the command-line front-end. One error boundary lives here.

Commands load lazily from the table in `surgery.cli.commands`: `surgery --help` imports
no command module, `surgery CMD` imports only CMD's. Exit codes:

    0    success
    1    bad input or a failed check (a SurgeryError): one line on stderr, no traceback
    2    bad usage (click's usage errors; an options object refusing a value)
    130  interrupted (Ctrl-C or SIGTERM): one line on stderr; atomic outputs are removed
    141  stdout was closed early (`surgery inspect X --json | head -1`): no message
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from types import FrameType
from typing import Any, NoReturn

import click

from surgery import __version__
from surgery.cli.commands import COMMANDS, CommandEntry
from surgery.errors import SurgeryError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `cat` reports when its reader goes away
INTERRUPTED = "interrupted; no output was written"


class LazyCommands(MutableMapping[str, click.Command]):
    """A group's `commands`: the table's names, each command imported on first lookup.

    Names, membership and iteration come from the table (no import); `commands[name]`
    imports the command's module. Commands added directly (`group.add_command`, or a
    module decorating with `@cli.command`) are kept as they are.
    """

    def __init__(self, table: Mapping[str, CommandEntry], loaded: Mapping[str, click.Command] | None = None) -> None:
        self.table = dict(table)
        self.loaded: dict[str, click.Command] = dict(loaded or {})

    def __getitem__(self, name: str) -> click.Command:
        if name not in self.loaded:
            if name not in self.table:
                raise KeyError(name)
            self.loaded[name] = load_command(self.table[name].target)
        return self.loaded[name]

    def __setitem__(self, name: str, cmd: click.Command) -> None:
        self.loaded[name] = cmd

    def __delitem__(self, name: str) -> None:
        found = self.table.pop(name, None) is not None
        found = self.loaded.pop(name, None) is not None or found
        if not found:
            raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self.table or name in self.loaded

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self.table) | set(self.loaded)))

    def __len__(self) -> int:
        return len(set(self.table) | set(self.loaded))

    def short_help(self, name: str, limit: int) -> str | None:
        """The line `surgery --help` shows for `name`, without importing it (None: hidden)."""
        if name in self.table:
            return self.table[name].short_help
        cmd = self.loaded[name]
        return None if cmd.hidden else cmd.get_short_help_str(limit)


def load_command(target: str) -> click.Command:
    """Import `"package.module:attribute"` and return that click command.

    Args:
        target: where the command lives, e.g. "surgery.cli.commands.inspect_cmd:inspect_cmd".
    Returns:
        The click.Command object.
    Raises:
        ImportError / AttributeError when the table names something that is not there,
        TypeError when the attribute is not a click command (both are bugs in the table).

    Example:
        >>> load_command("surgery.cli.commands.inspect_cmd:inspect_cmd").name
        'inspect'
    """
    module_name, _, attr = target.partition(":")
    cmd = getattr(importlib.import_module(module_name), attr)
    if not isinstance(cmd, click.Command):
        raise TypeError(f"{target} is a {type(cmd).__name__}, not a click command")
    return cmd


class SurgeryGroup(click.Group):
    """A click group with lazily imported commands and the CLI's one error boundary.

    SurgeryError (bad input, failed validation) -> one line on stderr, exit 1; click usage
    errors -> exit 2 (click's own handling); Ctrl-C / SIGTERM -> one line, exit 130; a
    closed stdout -> no message, exit 141; anything else is a bug -> one line asking for
    --debug, exit 1. --debug re-raises so the traceback shows.
    """

    commands: LazyCommands

    def __init__(self, *args: Any, table: Mapping[str, CommandEntry] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(table or {}, self.commands)

    def list_commands(self, ctx: click.Context | None) -> list[str]:
        """Every command name, from the table: imports nothing."""
        return list(self.commands)

    def get_command(self, ctx: click.Context | None, cmd_name: str) -> click.Command | None:
        """The named command, importing its module on first use (None: no such command)."""
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The help's command list, from the table's short help lines: imports nothing."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = [(n, h) for n in names if (h := self.commands.short_help(n, limit)) is not None]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:  # parsing the group's own options: --help and --version print here
            return super().make_context(info_name, args, parent=parent, **extra)
        except (KeyboardInterrupt, BrokenPipeError) as e:
            stop(e)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (KeyboardInterrupt, BrokenPipeError) as e:
            stop(e)
        except SurgeryError as e:
            if ctx.meta.get("surgery.debug"):
                raise
            click.echo(f"error: {one_line(e)}", err=True)
            ctx.exit(e.exit_code)
        except MemoryError:
            if ctx.meta.get("surgery.debug"):
                raise
            click.echo("error: out of memory; try a smaller --shard-size or fewer tensors in flight", err=True)
            ctx.exit(1)
        except Exception as e:  # noqa: BLE001 - the boundary: a traceback only with --debug
            if ctx.meta.get("surgery.debug"):
                raise
            click.echo(f"error: internal error: {type(e).__name__}: {one_line(e)} "
                       "(rerun with --debug for the traceback and report it)", err=True)
            ctx.exit(1)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def stop(e: BaseException) -> NoReturn:
    """End the run for an interrupt (one line, exit 130) or a closed stdout (quiet, exit 141)."""
    if isinstance(e, BrokenPipeError):
        detach_stdout()
        raise click.exceptions.Exit(EXIT_BROKEN_PIPE)
    click.echo(INTERRUPTED, err=True)
    raise click.exceptions.Exit(EXIT_INTERRUPTED)


def detach_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's last flush of a closed pipe stays silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real fd (a test runner's capture)
        pass


@click.group(cls=SurgeryGroup, context_settings=CONTEXT, table=COMMANDS)
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


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _sigterm_as_interrupt() -> Any:
    """Make SIGTERM raise KeyboardInterrupt; return the handler to restore (None: left alone)."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # started to ignore it (nohup-like): respect that
        return None
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        return None


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console entry point (`surgery`, `python -m surgery`); always exits.

    SIGTERM is handled like Ctrl-C (a KeyboardInterrupt), so `with atomic_output_dir(...)`
    blocks remove their temporary directories and the exit code is 130.

    Args:
        argv: the arguments after the program name (default: sys.argv[1:]).
    Raises:
        SystemExit with the exit code (see the module docstring).

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        surgery, version 0.1.0
    """
    previous = _sigterm_as_interrupt()
    try:
        cli.main(args=None if argv is None else list(argv), prog_name="surgery")
    except KeyboardInterrupt:  # outside click's own handling (start-up, teardown)
        sys.stderr.write(INTERRUPTED + "\n")
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(0)  # cli.main always exits; this line is for type checkers


if __name__ == "__main__":  # pragma: no cover
    main()
