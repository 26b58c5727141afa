"""surgery refine (and the report shared with `extract-lora --refine`)"""

from __future__ import annotations

import json
from pathlib import Path

import click

from surgery.ops.refine import OBJECTIVES, refine_adapter

from ..main import cli
from ..util import echo_json, human_bytes, human_count, progress_bar, table


def _fmt(v, spec=".3e") -> str:
    return "-" if v is None else format(v, spec)


def render_refine(res) -> str:
    """The held-out curve (stderr table) and a one-line summary."""
    kl = res.objective == "logits-kl"
    rows = [["no adapter", _fmt(res.no_adapter.loss), _fmt(res.no_adapter.kl if kl else res.no_adapter.cosine, ".6f"),
             _fmt(res.no_adapter.max_abs_diff), "", ""]]
    train = dict(res.train_loss)
    for p in res.curve:
        mark = "best" if p.step == res.best_step else ""
        rows.append([str(p.step), _fmt(p.loss), _fmt(p.kl if kl else p.cosine, ".6f"), _fmt(p.max_abs_diff),
                     _fmt(train.get(p.step)), mark])
    lines = [table(rows, ["step", "held-out loss", "KL" if kl else "cosine", "max abs diff", "train loss", ""],
                   "rrrrrl")]
    lines.append(
        f"{res.objective}: held-out loss {res.before.loss:.3e} -> {res.after.loss:.3e} (step {res.best_step}); "
        f"gap to the teacher closed {100 * res.gap_closed:.1f}% (SVD start: "
        f"{100 * (1 - res.before.loss / res.no_adapter.loss) if res.no_adapter.loss > 0 else 100:.1f}%); "
        f"{res.train_samples} train / {res.holdout_samples} held-out samples, "
        f"{human_count(res.trainable_params)} trainable, cache {human_bytes(res.cache_bytes)}, {res.seconds:.1f} s"
    )
    for n in res.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def refine_options(prefix: bool):
    """The refine options; with prefix=True named --refine-steps/-lr/-batch (extract-lora)."""
    p = "refine-" if prefix else ""

    def deco(f):
        opts = [
            click.option("--calibration", type=click.Path(path_type=str),
                         help="Unlabeled text: one sample per line, or JSONL with a \"text\" field."),
            click.option(f"--{p}steps", "refine_steps", type=click.IntRange(min=0), default=300, show_default=True,
                         help="Optimizer steps."),
            click.option(f"--{p}lr", "refine_lr", type=click.FloatRange(min=0), default=1e-3, show_default=True,
                         help="Peak learning rate (AdamW, warm-up then cosine decay); 0 keeps the adapter."),
            click.option(f"--{p}batch", "refine_batch", type=click.IntRange(min=1), default=16, show_default=True),
            click.option("--max-length", type=click.IntRange(min=2), default=128, show_default=True,
                         help="Tokens per calibration sample (longer ones are truncated)."),
            click.option("--objective", type=click.Choice(OBJECTIVES), default="auto", show_default=True,
                         help="pooled (encoders), hidden, logits-kl (causal LMs); auto picks by architecture."),
            click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
                         show_default=True, help="Share of the calibration samples held out for scoring."),
            click.option("--eval-every", type=click.IntRange(min=1), help="Held-out scoring interval (default steps/10)."),
            click.option("--threads", type=click.IntRange(min=1), help="CPU threads for the training (default: torch's)."),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


@cli.command("refine")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--teacher", required=True, type=click.Path(path_type=str), help="The model to imitate (the fine-tune).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=str), help="Refined adapter directory to write.")
@refine_options(prefix=False)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--report", type=click.Path(path_type=str), help="Write the full report as JSON here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def refine_cmd(base, adapter, teacher, out, calibration, refine_steps, refine_lr, refine_batch, max_length,
               objective, holdout, eval_every, threads, device, seed, report, overwrite, as_json, quiet):
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
    if calibration is None:
        raise click.UsageError("--calibration FILE is required (unlabeled text, one sample per line)")
    if report:
        from surgery.io import check_report_path

        check_report_path(report, [Path(base), Path(adapter), Path(teacher)], overwrite)
    with progress_bar(not quiet) as prog:
        res = refine_adapter(
            base, adapter, teacher, calibration, out, steps=refine_steps, lr=refine_lr, batch=refine_batch,
            max_length=max_length, objective=objective, holdout=holdout, eval_every=eval_every, device=device,
            seed=seed, threads=threads, overwrite=overwrite, progress=prog,
        )
    if report:
        from surgery.io import write_text_atomic

        write_text_atomic(report, json.dumps(res.to_json(), indent=2) + "\n")
    if as_json:
        echo_json(res.to_json())
    else:
        click.echo(render_refine(res), err=True)
        click.echo(f"wrote {out}: held-out {res.objective} loss {res.before.loss:.3e} -> {res.after.loss:.3e}")
