"""RefineOptions (surgery.options.refine): every rule once, errors naming the field; the CLI's
refine flags (one list, shared with extract-lora --refine) and their usage errors naming the flag.

Fast: no model is loaded here (the behaviour of refine is tests/test_refine.py).
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from surgery.errors import OptionError
from surgery.options.refine import OBJECTIVES, RefineOptions

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_resolved_values():
    o = RefineOptions(calibration="texts.txt")
    assert (o.steps, o.lr, o.batch_size, o.max_length, o.objective, o.holdout) == (1000, 3e-3, 32, 128, "auto", 0.1)
    assert o.device == "auto" and o.seed == 0 and o.threads is None and o.overwrite is False
    assert o.eval_interval == 100 and o.warmup_steps == 100
    assert o.replace(steps=5).eval_interval == 1 and o.replace(steps=5).warmup_steps == 1  # at least 1
    assert o.replace(steps=5000).warmup_steps == 100  # capped
    assert o.replace(eval_every=7, warmup=0).eval_interval == 7 and o.replace(warmup=0).warmup_steps == 0
    # negative control: the resolved values do follow the fields
    assert o.replace(steps=100).eval_interval != o.eval_interval


def test_frozen_and_list_becomes_tuple():
    o = RefineOptions(calibration=["a b", "c"])
    assert o.calibration == ("a b", "c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.steps = 3  # type: ignore[misc]
    assert o.to_json()["calibration"] == "(2 samples)"  # samples never land in a report
    assert RefineOptions(calibration=Path("x.txt")).to_json()["calibration"] == "x.txt"


def test_zero_steps_and_zero_lr_are_allowed():
    """0 steps scores only; lr 0 writes the adapter back unchanged (tests/test_refine.py)."""
    RefineOptions(calibration="c.txt", steps=0, lr=0.0)


BAD = [
    ("calibration", None), ("calibration", ""), ("calibration", ()), ("calibration", ("  ", "")),
    ("calibration", ("ok", 3)), ("calibration", 3),
    ("steps", -1), ("steps", 1.5), ("steps", True), ("steps", "10"),
    ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf), ("lr", -math.inf), ("lr", "0.1"), ("lr", True),
    ("warmup", -1), ("warmup", 2.0),
    ("batch_size", 0), ("batch_size", -3), ("batch_size", 8.0),
    ("max_length", 1), ("max_length", 0), ("max_length", math.nan),
    ("objective", "mse"), ("objective", None),
    ("holdout", 0.0), ("holdout", 1.0), ("holdout", 1.5), ("holdout", -0.1), ("holdout", math.nan),
    ("holdout", math.inf),
    ("eval_every", 0), ("eval_every", -5),
    ("seed", 1.0), ("seed", "0"), ("seed", None),
    ("threads", 0), ("threads", 2.5),
    ("device", "tpu"), ("device", "cuda:x"), ("device", None),
    ("overwrite", "yes"),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_values_name_their_field(name, value):
    kw = {"calibration": "c.txt", name: value}
    with pytest.raises(OptionError) as e:
        RefineOptions(**kw)
    assert e.value.field == name
    assert str(e.value).startswith(f"{name}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("name,value", [("steps", 1), ("lr", 0.5), ("warmup", 0), ("batch_size", 1),
                                        ("max_length", 2), ("holdout", 0.5), ("eval_every", 1), ("seed", -3),
                                        ("threads", 1), ("device", "cuda:1"), ("device", "cpu"),
                                        ("objective", "logits-kl")])
def test_good_values_pass(name, value):
    """Negative control of the table above: the edges just inside each rule are accepted."""
    assert getattr(RefineOptions(calibration="c.txt", **{name: value}), name) == value


def test_objectives_are_the_documented_ones():
    assert OBJECTIVES == ("auto", "pooled", "relational", "hidden", "logits-kl")


def test_refine_adapter_checks_options_before_touching_inputs(tmp_path):
    """Bad options fail before any path is looked at (the paths here do not exist)."""
    from surgery.ops.refine import refine_adapter

    missing = tmp_path / "nope"
    with pytest.raises(OptionError, match="^holdout: ") as e:
        refine_adapter(missing, missing, tmp_path / "out", teacher=missing, calibration="c.txt", holdout=2)
    assert e.value.field == "holdout"
    # fields replace those of an options object
    base = RefineOptions(calibration="c.txt")
    with pytest.raises(OptionError, match="^batch_size: "):
        refine_adapter(missing, missing, tmp_path / "out", base, teacher=missing, batch_size=0)
    with pytest.raises(TypeError):  # an unknown field is a programming error, not bad input
        refine_adapter(missing, missing, tmp_path / "out", teacher=missing, calibration="c.txt", batch=8)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- CLI


def _probe(prefix: bool):
    """A command with the shared refine flags that only builds the options."""
    from surgery.cli.commands.refine_cmd import build_refine_options, refine_flags

    @click.command()
    @refine_flags(prefix=prefix)
    @click.option("--device", default="auto")
    @click.pass_context
    def probe(ctx, **_):
        click.echo(repr(build_refine_options(ctx)))

    return probe


def test_cli_flags_build_options_with_defaults():
    r = CliRunner().invoke(_probe(False), ["--calibration", "c.txt", "--steps", "7", "--batch", "4", "--lr", "0"])
    assert r.exit_code == 0, r.output
    assert "steps=7" in r.output and "batch_size=4" in r.output and "lr=0.0" in r.output
    assert "max_length=128" in r.output and "objective='auto'" in r.output  # defaults are RefineOptions'


@pytest.mark.parametrize("prefix,args,flag", [
    (False, ["--steps", "-1"], "--steps"),
    (False, ["--lr", "nan"], "--lr"),
    (False, ["--lr", "inf"], "--lr"),
    (False, ["--batch", "0"], "--batch"),
    (False, ["--holdout", "1"], "--holdout"),
    (False, ["--objective", "mse"], "--objective"),
    (False, ["--max-length", "1"], "--max-length"),
    (False, ["--eval-every", "0"], "--eval-every"),
    (False, ["--device", "tpu"], "--device"),
    (True, ["--refine-steps", "-1"], "--refine-steps"),
    (True, ["--refine-lr", "nan"], "--refine-lr"),
    (True, ["--refine-batch", "0"], "--refine-batch"),
    (True, ["--refine-warmup", "-2"], "--refine-warmup"),
])
def test_cli_bad_values_exit_2_naming_the_flag(prefix, args, flag):
    r = CliRunner().invoke(_probe(prefix), ["--calibration", "c.txt", *args])
    assert r.exit_code == 2, r.output
    assert f"{flag}: " in r.output


def test_cli_missing_calibration_is_a_usage_error():
    r = CliRunner().invoke(_probe(True), ["--refine-steps", "3"])
    assert r.exit_code == 2 and "--calibration: is required" in r.output
    # negative control: with it, the same command succeeds
    assert CliRunner().invoke(_probe(True), ["--refine-steps", "3", "--calibration", "c.txt"]).exit_code == 0


def test_refine_command_usage_errors(tmp_path):
    from surgery.cli.main import cli

    args = ["refine", str(tmp_path / "b"), str(tmp_path / "a"), "--teacher", str(tmp_path / "t"), "-o",
            str(tmp_path / "o"), "--calibration", str(tmp_path / "c.txt")]
    for extra, flag in [(["--lr", "-1"], "--lr"), (["--threads", "0"], "--threads"), (["--seed", "x"], "--seed")]:
        r = CliRunner().invoke(cli, args + extra)
        assert r.exit_code == 2 and flag in r.stderr, (extra, r.output)
    r = CliRunner().invoke(cli, args[:-2])
    assert r.exit_code == 2 and "--calibration" in r.stderr
    assert not (tmp_path / "o").exists()


def test_refine_modules_import_no_torch_at_top():
    """`surgery refine --help` stays fast: the command module's top-level imports are light, and the
    options module imports nothing heavy (checked in a fresh interpreter)."""
    import ast

    tree = ast.parse((ROOT / "surgery" / "cli" / "commands" / "refine_cmd.py").read_text())
    top = [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
    top += [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    heavy = ("torch", "transformers", "surgery.ops", "surgery.onnx", "surgery.core")
    assert not [m for m in top if m.startswith(heavy)], top
    assert "surgery.options.refine" in top  # negative control: the walk does see the imports
    code = ("import sys, surgery.options.refine; "
            "bad = [m for m in ('torch', 'transformers', 'surgery.ops', 'surgery.core') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
