"""Shared CLI pieces: progress bars on stderr, tables, JSON output, option types."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import click


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def table(rows: list[list], headers: list[str], align: str | None = None) -> str:
    """A plain-text table; align is a string of 'l'/'r' per column. Cells are escaped
    (surgery.io.escape_name): a tensor name from a checkpoint never breaks a line or the terminal."""
    from surgery.io.guards import escape_name  # imported when a table is drawn, not when the CLI starts

    cells = [[str(c) for c in headers]] + [[escape_name(c, 200) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)
    out = []
    for j, r in enumerate(cells):
        padded = (c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align, strict=False))
        out.append("  ".join(padded).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


@contextmanager
def progress_bar(enabled: bool = True):
    """Yields a callback(desc, done, total) drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def update(desc: str, done: int, total: int, postfix: str | None = None) -> None:
        if not enabled:
            return
        bar = bars.get(desc)
        if bar is None:
            for b in bars.values():
                b.close()
            bars.clear()
            bar = bars[desc] = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                                   disable=None)  # None: no bar when stderr is not a terminal
        bar.n = done
        if postfix:
            bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        for b in bars.values():
            b.close()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return str(n)


class SizeType(click.ParamType):
    """'5GB', '500MB', '2GiB' -> bytes; bad values are a usage error (exit 2)."""

    name = "size"

    def convert(self, value, param, ctx):
        from surgery.errors import OptionError
        from surgery.io import parse_size

        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except OptionError as e:
            self.fail(str(e), param, ctx)


class RegexType(click.ParamType):
    name = "regex"

    def convert(self, value, param, ctx):
        import re

        try:
            re.compile(value)
        except re.error as e:
            self.fail(f"{value!r} is not a valid regular expression ({e})", param, ctx)
        return value


class BudgetType(click.ParamType):
    """A LoRA parameter budget: a count ('2e6', '150000') or a share of the model ('1%').

    Only the syntax is checked here (bad values are usage errors, exit 2); the
    library turns a percentage into a count once it knows the model's size."""

    name = "budget"

    def convert(self, value, param, ctx):
        from surgery.core.lowrank import parse_budget
        from surgery.errors import OptionError

        try:
            parse_budget(str(value).strip(), 10**15)
        except OptionError as e:
            self.fail(str(e), param, ctx)
        return str(value).strip()


def build_options(cls, ctx: click.Context | None = None, **kwargs):
    """The one place click's parsed flags become a library options object.

    Parameters are passed by field name; a rule the options object refuses is a usage error
    (exit 2) naming the flag: the one the command declares for that field (a click option whose
    parameter name is the field, e.g. `click.option("--refine-steps", "steps")`), else
    `--field-name` (`rank` -> `--rank`)."""
    from surgery.errors import OptionError

    try:
        return cls(**kwargs)
    except OptionError as e:
        msg = str(e)
        if e.field:
            flag = _flag_of(ctx, e.field)
            prefix = f"{e.field}: "
            msg = f"{flag}: {msg[len(prefix):]}" if msg.startswith(prefix) else f"{flag}: {msg}"
        raise click.UsageError(msg, ctx=ctx) from None


def _flag_of(ctx: click.Context | None, field: str) -> str:
    """The long flag a command declares for an options field (its click parameter name)."""
    params = ctx.command.params if ctx is not None else []
    for p in params:
        if p.name == field and isinstance(p, click.Option):
            longs = [o for o in p.opts if o.startswith("--")]
            return (longs or p.opts)[0]
    return "--" + field.replace("_", "-")


# ----------------------------------------------------------------------------- options every command shares
# One definition each, so flags read the same on every command.


def out_option(help: str = "Output directory.", required: bool = True):
    return click.option("-o", "--out", required=required, type=click.Path(path_type=str), help=help)


def overwrite_option(what: str = "an existing output"):
    return click.option("--overwrite", is_flag=True, help=f"Replace {what}.")


def json_option(help: str = "Print the result as JSON on stdout (reports stay on stderr)."):
    return click.option("--json", "as_json", is_flag=True, help=help)


def quiet_option():
    return click.option("-q", "--quiet", is_flag=True, help="No progress bar and no report on stderr.")


def dtype_option(help: str, choices: tuple[str, ...] = ("fp32", "fp16", "bf16"), default: str | None = None):
    return click.option("--dtype", type=click.Choice(list(choices)), default=default,
                        show_default=default is not None, help=help)


def device_option(help: str = "Where the math runs: auto = cuda when one is available, else cpu."):
    return click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]", help=help)


def threads_option():
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="CPU threads for torch (default: torch's own choice).")


# ----------------------------------------------------------------------------- report helpers


def flagify(text: str, ctx: click.Context | None = None) -> str:
    """A library message with option fields in backquotes (`max_rank`) -> the command's flags (--max-rank).

    Example:
        >>> flagify("raise `max_rank`")
        'raise --max-rank'
    """
    import re

    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: _flag_of(ctx, m.group(1)), text)


def warning_lines(warnings, ctx: click.Context | None = None) -> list[str]:
    """'warning: ...' lines, each warning once, fields named by their flags."""
    from surgery.io import escape_name
    from surgery.report.checks import dedupe

    return [f"warning: {escape_name(flagify(w, ctx))}" for w in dedupe(warnings)]


def note_lines(notes, ctx: click.Context | None = None) -> list[str]:
    """'note: ...' lines, each note once (in first order), fields named by their flags."""
    from surgery.io import escape_name
    from surgery.report.checks import dedupe

    return [f"note: {escape_name(flagify(n, ctx))}" for n in dedupe(notes)]


def shown_line(shown: int, total: int, what: str = "modules", order: str = "worst first",
               where: str = "--report FILE / --json") -> str | None:
    """The line saying that a table is a summary (None when it shows everything).

    Example:
        >>> shown_line(20, 36)
        '(a summary: 20 of 36 modules shown, worst first; all of them in --report FILE / --json)'
    """
    if shown >= total:
        return None
    return f"(a summary: {shown} of {total} {what} shown, {order}; all of them in {where})"


def plot_option(what: str):
    return click.option("--plot", "plot", type=click.Path(path_type=str), help=f"Draw {what} (PNG/SVG/PDF; needs "
                        "matplotlib, the 'plot' extra).")


def check_plot(plot: str | None, overwrite: bool, inputs, ctx: click.Context | None = None) -> None:
    """Validate a --plot path before any work (surgery.report.plots.check_plot_path): a bad file
    name is a usage error (exit 2) naming --plot; an input or an existing file is the library's error."""
    if not plot:
        return
    from surgery.errors import OptionError
    from surgery.report.plots import check_plot_path

    try:
        check_plot_path(plot, overwrite, [p for p in inputs if p is not None])
    except OptionError as e:
        raise click.UsageError(f"--plot: {str(e).removeprefix('plot ')}", ctx=ctx) from None
