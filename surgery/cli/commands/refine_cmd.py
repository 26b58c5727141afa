"""surgery refine, and the refine flags and report shared with `extract-lora --refine`.

The flags are declared once here (refine_flags) and become a RefineOptions in one place
(build_refine_options, on cli.util.build_options): every rule lives on RefineOptions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import click

from surgery.options.refine import OBJECTIVES, RefineOptions

from ..main import cli
from ..util import (
    build_options,
    check_plot,
    device_option,
    echo_json,
    human_bytes,
    human_count,
    json_option,
    note_lines,
    out_option,
    overwrite_option,
    plot_option,
    progress_bar,
    quiet_option,
    table,
    threads_option,
    warning_lines,
)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RefineOptions)}


def _fmt(v, spec=".3e") -> str:
    return "-" if v is None else format(v, spec)


def render_refine(res, ctx: click.Context | None = None) -> str:
    """The held-out curve (stderr table: the objective and KL in scientific notation, a labelled
    checkpoint column), a one-line summary, notes and warnings (each once)."""
    kl = res.objective == "logits-kl"
    third = "KL (nats/token)" if kl else "cosine to teacher"
    spec = ".3e" if kl else ".6f"
    rows = [["no adapter", _fmt(res.no_adapter.loss), _fmt(res.no_adapter.kl if kl else res.no_adapter.cosine, spec),
             _fmt(res.no_adapter.max_abs_diff), "", "base alone (reference)"]]
    train = dict(res.train_loss)
    for p in res.curve:
        mark = "best: saved" if p.step == res.best_step else ""
        rows.append([str(p.step), _fmt(p.loss), _fmt(p.kl if kl else p.cosine, spec), _fmt(p.max_abs_diff),
                     _fmt(train.get(p.step)), mark])
    lines = [table(rows, ["step", "held-out loss", third, "max abs diff", "train loss", "checkpoint"], "rrrrrl")]
    lines.append(
        f"{res.objective}: held-out loss {res.before.loss:.3e} -> {res.after.loss:.3e} (step {res.best_step}); "
        f"gap to the teacher closed {100 * res.gap_closed:.1f}% (SVD start: "
        f"{100 * (1 - res.before.loss / res.no_adapter.loss) if res.no_adapter.loss > 0 else 100:.1f}%); "
        f"{res.train_samples} train / {res.holdout_samples} held-out samples, "
        f"{human_count(res.trainable_params)} trainable, cache {human_bytes(res.cache_bytes)}, {res.seconds:.1f} s"
    )
    lines += note_lines(res.notes, ctx)
    lines += warning_lines(getattr(res, "warnings", []), ctx)
    return "\n".join(lines)


def refine_flags(prefix: bool = False) -> Callable:
    """The flags of RefineOptions' refine-only fields, each click parameter named by its field.

    prefix=True names the training flags --refine-steps/-lr/-warmup/-batch (extract-lora, where
    they sit beside the extraction's own). --device, --seed, --threads and --overwrite are the
    command's own (shared with what else it does); build_refine_options picks them up too.
    No ranges here: RefineOptions checks every value (exit 2 naming the flag)."""
    p = "refine-" if prefix else ""
    d = _DEFAULTS
    opts = [
        click.option("--calibration", type=click.Path(path_type=str),
                     help="Unlabeled text: one sample per line, or JSONL with a \"text\" field."),
        click.option(f"--{p}steps", "steps", type=int, default=d["steps"], show_default=True,
                     help="Optimizer steps (0 scores the adapter and writes it back unchanged)."),
        click.option(f"--{p}lr", "lr", type=float, default=d["lr"], show_default=True,
                     help="Peak learning rate (AdamW, warm-up then cosine decay); 0 keeps the adapter."),
        click.option(f"--{p}warmup", "warmup", type=int, default=None,
                     help="Warm-up steps (default steps/10, between 1 and 100)."),
        click.option(f"--{p}batch", "batch_size", type=int, default=d["batch_size"], show_default=True,
                     help="Samples per step."),
        click.option("--max-length", "max_length", type=int, default=d["max_length"], show_default=True,
                     help="Tokens per calibration sample (longer ones are truncated)."),
        click.option("--objective", "objective", default=d["objective"], show_default=True,
                     metavar="|".join(OBJECTIVES),
                     help="pooled (encoders), relational, hidden, logits-kl (causal LMs), or a sum such as "
                          "pooled+relational; auto picks by architecture."),
        click.option("--holdout", "holdout", type=float, default=d["holdout"], show_default=True,
                     help="Share of the calibration samples held out for scoring, in (0, 1)."),
        click.option("--eval-every", "eval_every", type=int, default=None,
                     help="Held-out scoring interval in steps (default steps/10)."),
        click.option("--objective-weights", "weights", type=float, multiple=True,
                     help="One weight per component of a summed objective (e.g. pooled+relational), in order."),
        click.option("--layers", "layers", type=int, multiple=True,
                     help="Hidden-state indices for the hidden objective (repeatable; default middle and last)."),
        click.option(f"--{p}train-vectors/--{p}no-train-vectors", "train_vectors", default=False, show_default=True,
                     help="Also train the biases and norm vectors the adapter carries."),
        click.option("--patience", "patience", type=int, default=None,
                     help="Stop after this many held-out evaluations without improvement."),
    ]

    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


def build_refine_options(ctx: click.Context, params: Mapping[str, Any] | None = None) -> RefineOptions:
    """RefineOptions from a command's parsed flags (default: ctx.params); flags that are not
    RefineOptions fields are ignored. A refused value is a usage error (exit 2) naming its flag.

    Example (extract-lora --refine): ``ropts = build_refine_options(ctx)`` picks calibration,
    steps (--refine-steps), lr, warmup, batch_size, max_length, objective, holdout, eval_every,
    and the command's device, seed, threads and overwrite."""
    params = ctx.params if params is None else params
    names = RefineOptions.field_names()
    fields = {k: v for k, v in params.items() if k in names}
    for k in ("weights", "layers"):  # click's multiple=True gives () when the flag is absent
        if fields.get(k) == ():
            fields[k] = None
    return build_options(RefineOptions, ctx, **fields)


@cli.command("refine")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--teacher", required=True, type=click.Path(path_type=str), help="The model to imitate (the fine-tune).")
@out_option("Refined adapter directory to write.")
@refine_flags()
@device_option()
@click.option("--seed", type=int, default=_DEFAULTS["seed"], show_default=True,
              help="Seeds the hold-out split, the batch order and torch.")
@threads_option()
@click.option("--report", type=click.Path(path_type=str), help="Write the full report as JSON here.")
@plot_option("the train / held-out loss and the gap closed per evaluation, best step marked")
@overwrite_option("an existing output directory (and --report / --plot file)")
@json_option("Print the report as JSON on stdout.")
@quiet_option()
@click.pass_context
def refine_cmd(ctx, base, adapter, teacher, out, report, plot, as_json, quiet, **_flags):
    """Train a LoRA adapter's factors so that BASE + ADAPTER imitates TEACHER.

    Only the LoRA A/B matrices train, on unlabeled calibration text, to match the
    teacher's outputs (sentence embeddings for encoders, next-token distributions for
    causal LMs); the best checkpoint on a held-out part is saved as a PEFT adapter
    with the same modules and ranks. Works on any LoRA adapter (ours or PEFT's).

    \b
    Examples:
      surgery refine base/ lora/ --teacher ft/ --calibration texts.txt -o lora-refined/
      surgery refine base/ lora/ --teacher ft/ --calibration data.jsonl -o out/ --steps 500 --report r.json
    """
    opts = build_refine_options(ctx)
    from surgery.io import escape_name
    from surgery.ops.refine import refine_adapter

    inputs = [p for p in (base, adapter, teacher, opts.calibration) if p]
    check_plot(plot, opts.overwrite, inputs, ctx)
    # the library checks OUT and REPORT against every input (the calibration file too) and each
    # other before any work, and writes the report with OUT (a full disk fails before OUT is touched)
    with progress_bar(not quiet) as prog:
        res = refine_adapter(base, adapter, out, opts, teacher=teacher, progress=prog, report=report)
    if plot:
        from surgery.report.plots import plot_refine

        plot_refine(res, plot, inputs=inputs, overwrite=opts.overwrite)
    if as_json:
        echo_json(res.to_json())
        return
    if not quiet:
        click.echo(render_refine(res, ctx), err=True)
    click.echo(f"wrote {escape_name(out)}: held-out {res.objective} loss {res.before.loss:.3e} -> "
               f"{res.after.loss:.3e}")
