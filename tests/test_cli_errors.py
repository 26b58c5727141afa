"""Exit codes and messages: every command driven with bad inputs through the CLI.

The contract (README, "Exit codes"): 0 success; 1 bad input or a failed check, with
exactly one line on stderr ("error: ..."), no traceback; 2 bad usage (click's usage
errors: unknown option, bad option value, missing argument). An "internal error"
line means an exception escaped the library's SurgeryError net: a bug.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgery.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
COMMANDS = sorted(cli.commands)


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def check_exit_1(r, needle: str | None = None) -> str:
    assert r.exit_code == 1, f"exit {r.exit_code}: {r.output}"
    assert "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {r.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "internal error" not in lines[0], lines[0]
    if needle is not None:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]


def check_exit_2(r, needle: str | None = None) -> None:
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.output}"
    assert "Traceback" not in r.output and "Usage:" in r.output and "Error:" in r.output, r.output
    if needle is not None:
        assert needle.lower() in r.output.lower(), r.output


# ----------------------------------------------------------------------------- argv per command


def argv(cmd: str, model, out, *, ft=None, adapter=None, cal=None) -> list:
    """A valid command line for `cmd` with `model` as its main input and `out` as its output."""
    ft = ft or FIX / "tiny-bert-ft"
    adapter = adapter or FIX / "tiny-bert-lora"
    return {
        "inspect": ["inspect", model],
        "extract-lora": ["extract-lora", model, ft, "-o", out, "--rank", "2", "-q"],
        "merge": ["merge", model, adapter, "-o", out],
        "export-onnx": ["export-onnx", model, "-o", out, "--no-validate"],
        "demo": ["demo", model, ft, "--workdir", out, "--no-optimize"],
        "analyze": ["analyze", model, "-q"],
        "init-lora": ["init-lora", model, "-o", out, "--rank", "2", "-q"],
        "init-adapter": ["init-adapter", model, "-o", out, "--bottleneck", "2", "-q"],
        "factorize": ["factorize", model, "-o", out, "--rank", "2", "-q", "--no-check"],
        "refine": ["refine", model, adapter, "--teacher", ft, "-o", out, "--calibration", cal or "cal.txt",
                   "--steps", "1", "-q"],
    }[cmd]


KNOWN = {"inspect", "extract-lora", "merge", "export-onnx", "demo", "analyze", "init-lora", "init-adapter",
         "factorize", "refine"}
WITH_OUT = [c for c in COMMANDS if c in KNOWN and c not in ("inspect", "analyze")]


def test_every_command_is_covered():
    """A new command must be added to argv() (and so to this file's matrix)."""
    assert set(COMMANDS) <= KNOWN, set(COMMANDS) - KNOWN


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, Path]:
    """Hostile or broken inputs, built once."""
    d = tmp_path_factory.mktemp("bad")
    out = {}
    out["missing"] = d / "no-such-model"
    out["textfile"] = d / "notes.txt"
    out["textfile"].write_text("not a checkpoint\n")
    out["emptydir"] = d / "empty"
    out["emptydir"].mkdir()
    corrupt = d / "corrupt"
    shutil.copytree(FIX / "tiny-bert", corrupt)
    header = b'{"w": {"dtype": "F32"' + b" " * 40  # JSON cut short
    (corrupt / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    out["corrupt"] = corrupt
    trunc = d / "truncated"
    shutil.copytree(FIX / "tiny-bert", trunc)
    blob = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    out["truncated"] = trunc
    badcfg = d / "badconfig"
    shutil.copytree(FIX / "tiny-bert", badcfg)
    (badcfg / "config.json").write_text("{not json")
    out["badconfig"] = badcfg
    out["adapter"] = FIX / "tiny-bert-lora"  # an adapter where a model is expected
    cal = d / "cal.txt"
    cal.write_text("\n".join(f"sentence number {i} about nothing" for i in range(20)) + "\n")
    out["cal"] = cal
    return out


BAD_INPUTS = ["missing", "textfile", "emptydir", "corrupt", "truncated", "badconfig", "adapter"]




# export-onnx hands the directory to transformers without open_checkpoint first: a corrupt
# safetensors file escapes as "internal error: SafetensorError" (reported to the lead).



def _main_input_cases():
    for cmd in COMMANDS:
        if cmd not in KNOWN:
            continue
        for kind in BAD_INPUTS:
            if cmd == "inspect" and kind == "adapter":
                continue  # inspect reads adapters too
            yield pytest.param(cmd, kind, id=f"{cmd}-{kind}")


@pytest.mark.parametrize("cmd,kind", list(_main_input_cases()))
def test_bad_main_input_exit_1(cmd, kind, bad, tmp_path):
    out = tmp_path / "out"
    r = run(argv(cmd, bad[kind], out, cal=bad["cal"]))
    check_exit_1(r)
    assert not out.exists(), f"{cmd} left {out} behind"
    assert not list(tmp_path.glob(".out.surgery-tmp-*"))


@pytest.mark.parametrize("cmd", [c for c in ("merge", "refine") if c in COMMANDS])
@pytest.mark.parametrize("kind", ["missing", "emptydir", "model-as-adapter", "textfile"])
def test_bad_adapter_exit_1(cmd, kind, bad, tmp_path):
    adapter = FIX / "tiny-bert" if kind == "model-as-adapter" else bad[kind]
    r = run(argv(cmd, FIX / "tiny-bert", tmp_path / "out", adapter=adapter, cal=bad["cal"]))
    check_exit_1(r)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "corrupt", "adapter", "wrong-architecture", "textfile"])
def test_extract_bad_fine_tune_exit_1(kind, bad, tmp_path):
    ft = FIX / "tiny-llama-ft" if kind == "wrong-architecture" else bad[kind]
    check_exit_1(run(argv("extract-lora", FIX / "tiny-bert", tmp_path / "out", ft=ft)))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- output locations


def _out_case(case: str, tmp_path: Path, model: Path) -> tuple[Path, list[str]]:
    if case == "exists":
        out = tmp_path / "out"
        out.mkdir()
        (out / "keep.txt").write_text("keep")
        return out, []
    if case == "is-a-file":
        out = tmp_path / "out"
        out.write_text("keep")
        return out, ["--overwrite"]
    if case == "parent-is-a-file":
        (tmp_path / "file").write_text("keep")
        return tmp_path / "file" / "out", []
    if case == "equals-input":
        return model, ["--overwrite"]
    if case == "inside-input":
        return model / "sub", []
    if case == "contains-input":  # --overwrite would delete the input with the old output
        return tmp_path, ["--overwrite"]
    raise AssertionError(case)


OUT_CASES = {"exists": "--overwrite", "is-a-file": "not a directory", "parent-is-a-file": "not a directory",
             "equals-input": "input", "inside-input": "inside the input", "contains-input": "contains the input"}


def _supports_overwrite(cmd: str) -> bool:
    return any(o.name == "overwrite" for o in cli.commands[cmd].params)


@pytest.mark.parametrize("case", sorted(OUT_CASES))
@pytest.mark.parametrize("cmd", WITH_OUT)
def test_bad_output_location_exit_1(cmd, case, bad, tmp_path):
    if cmd == "demo" and case in ("exists", "contains-input"):
        pytest.skip("demo writes lora/, merged/, onnx/ inside --workdir (replaced on each run), never the dir itself")
    model = tmp_path / "model"
    shutil.copytree(FIX / "tiny-bert", model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    out, extra = _out_case(case, tmp_path, model)
    if extra and not _supports_overwrite(cmd):
        extra = []
    args = argv(cmd, model, out, cal=bad["cal"]) + extra
    line = check_exit_1(run(args))
    if cmd != "demo" or case not in ("exists", "is-a-file"):
        assert OUT_CASES[case].lower() in line.lower(), line
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # the input is untouched
    if case == "exists":
        assert (out / "keep.txt").read_text() == "keep"
    if case == "is-a-file":
        assert out.read_text() == "keep"


# ----------------------------------------------------------------------------- usage errors (exit 2)


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c in KNOWN])
def test_usage_errors_exit_2(cmd, tmp_path, bad):
    good = argv(cmd, FIX / "tiny-bert", tmp_path / "out", cal=bad["cal"])
    check_exit_2(run([cmd, *good[1:], "--no-such-option"]), "no such option")
    if cmd != "demo":  # demo's arguments are optional
        check_exit_2(run([cmd]), "missing")
    if "-o" in good:
        i = good.index("-o")
        check_exit_2(run(good[:i] + good[i + 2:]), "--out")
    assert not (tmp_path / "out").exists()


BAD_VALUES = {
    "extract-lora": [["--rank", "0"], ["--rank", "x"], ["--energy", "1.5"], ["--svd", "qr"], ["--include", "("],
                     ["--niter", "-1"], ["--max-rank", "0"], ["--dtype", "int8"], ["--device", "tpu"],
                     ["--seed", "x"]],
    "merge": [["--weight", "x"], ["--weight", "nan"], ["--weight", "1", "--weight", "2"], ["--dtype", "int4"],
              ["--shard-size", "5XB"], ["--shard-size", "-1"], ["--device", "tpu"]],
    "export-onnx": [["--opset", "5"], ["--dtype", "int8"], ["--task", "bogus"], ["--atol", "-1"],
                    ["--device", "tpu"]],
    "demo": [["--rank", "0"]],
    "analyze": [["--ranks", "a,b"], ["--exact-max", "0"], ["--include", "("]],
    "init-lora": [["--rank", "0"], ["--method", "bogus"], ["--shard-size", "lots"], ["--include", "[a-"]],
    "init-adapter": [["--bottleneck", "0"], ["--placement", "nowhere"], ["--modules", "("]],
    "factorize": [["--rank", "0"], ["--energy", "2"], ["--min-savings", "1"]],
    "refine": [["--steps", "-1"], ["--batch", "0"], ["--objective", "mse"], ["--holdout", "1"]],
    "inspect": [],
}


@pytest.mark.parametrize("cmd,extra", [(c, e) for c in COMMANDS if c in KNOWN for e in BAD_VALUES.get(c, [])],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_option_values_exit_2(cmd, extra, tmp_path, bad):
    r = run(argv(cmd, FIX / "tiny-bert", tmp_path / "out", cal=bad["cal"]) + extra)
    check_exit_2(r)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c in KNOWN])
def test_help_has_examples(cmd):
    r = run([cmd, "--help"])
    assert r.exit_code == 0 and "Example" in r.output, r.output
    assert run([cmd, "-h"]).exit_code == 0


def test_version_and_unknown_command():
    r = run(["--version"])
    assert r.exit_code == 0 and "surgery" in r.output
    check_exit_2(run(["no-such-command"]), "no such command")


# ----------------------------------------------------------------------------- the boundary itself


def patch_inspect(monkeypatch, fn) -> None:
    """Replace inspect_checkpoint for `surgery inspect`, imported at its module's top or inside the command."""
    import surgery.cli.commands.inspect_cmd as cmd_module

    monkeypatch.setattr("surgery.ops.inspect.inspect_checkpoint", fn)
    monkeypatch.setattr(cmd_module, "inspect_checkpoint", fn, raising=False)


def test_debug_shows_traceback_and_internal_errors_are_one_line(monkeypatch, tmp_path):
    """--debug re-raises (traceback); an unexpected exception is one line asking for --debug, exit 1."""
    import surgery.ops.inspect as sins

    r = CliRunner().invoke(cli, ["--debug", "inspect", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.exception is not None and type(r.exception).__name__ == "CheckpointError"

    def boom(path):
        raise KeyError("unexpected")

    monkeypatch.setattr("surgery.ops.inspect.inspect_checkpoint", boom)  # looked up when the command runs
    r = run(["inspect", FIX / "tiny-bert"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" in lines[0] and "--debug" in lines[0]
    assert sins  # the real function is untouched


def test_error_message_is_one_line_even_for_multiline_exceptions(monkeypatch):
    from surgery.errors import CheckpointError

    def boom(path):
        raise CheckpointError("first line\nsecond line\n\tthird")

    monkeypatch.setattr("surgery.ops.inspect.inspect_checkpoint", boom)  # looked up when the command runs
    line = check_exit_1(run(["inspect", FIX / "tiny-bert"]))
    assert line == "error: first line second line third"


def test_json_flag_errors_are_not_json_on_stdout(bad):
    """With --json, a failure still goes to stderr; stdout stays empty (no half document)."""
    r = run(["inspect", bad["corrupt"], "--json"])
    check_exit_1(r)
    assert r.stdout.strip() == ""
    ok = run(["inspect", FIX / "tiny-bert", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["tensor_count"] > 0


# ----------------------------------------------------------------------------- options objects (exit 2)


def _toy_group():
    """A group with one command whose options object refuses rank < 1 (built the CLI's way)."""
    import dataclasses

    import click

    from surgery.cli.main import SurgeryGroup
    from surgery.cli.util import build_options
    from surgery.errors import OptionError
    from surgery.options.base import Options, positive_int

    @dataclasses.dataclass(frozen=True)
    class ToyOptions(Options):
        max_rank: int = 1

        def validate(self) -> None:
            positive_int(self.max_rank, "max_rank")

    @click.command("toy")
    @click.option("--max-rank", type=int, default=1)
    @click.option("--late", is_flag=True, help="Raise an OptionError after the options were built.")
    @click.pass_context
    def toy(ctx, max_rank, late):
        build_options(ToyOptions, ctx, max_rank=max_rank)
        if late:
            raise OptionError("max_rank: 4 exceeds min(out=2, in=3) for w; use a rank <= 2", field="max_rank")
        click.echo("ok")

    return SurgeryGroup("surgery", commands=[toy])


def test_option_error_while_options_are_built_is_exit_2_naming_the_flag():
    r = CliRunner().invoke(_toy_group(), ["toy", "--max-rank", "0"])
    check_exit_2(r, "--max-rank: must be a positive integer, got 0")
    assert CliRunner().invoke(_toy_group(), ["toy", "--max-rank", "3"]).output == "ok\n"  # control


def test_option_error_raised_by_the_operation_is_exit_1():
    """A rule that needs the data (checked after the options were built) is bad input, not bad usage."""
    check_exit_1(CliRunner().invoke(_toy_group(), ["toy", "--late"]), "use a rank <= 2")


# ----------------------------------------------------------------------------- signals and pipes (subprocesses)


def run_python(code: str, *args, cwd: Path | None = None, **popen) -> subprocess.Popen:
    """Start `python -c code args` with this checkout's surgery importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd or ROOT)])}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=cwd or ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def check_interrupted(p: subprocess.Popen, stderr: str) -> None:
    assert p.returncode == 130, (p.returncode, stderr)
    assert stderr.strip().splitlines() == ["interrupted; no output was written"], stderr


@pytest.mark.parametrize("args", [["inspect", FIX / "tiny-llama", "--json"], ["--help"], ["merge", "--help"]],
                         ids=["inspect", "group-help", "command-help"])
def test_closed_stdout_exits_quietly(args):
    """`surgery inspect X --json | head -1`: no traceback, no message; exit 141 like `cat` (128 + SIGPIPE)."""
    p = run_python("from surgery.cli.main import main; main()", *args)
    p.stdout.close()  # the reader goes away before anything is written
    stderr = p.stderr.read()
    p.wait(timeout=120)
    assert (p.returncode, stderr) == (141, "")


def test_open_stdout_is_the_control():
    p = run_python("from surgery.cli.main import main; main()", "inspect", FIX / "tiny-llama", "--json")
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and stderr == "" and json.loads(stdout)["tensor_count"] > 0


SLEEPY = """
import signal, sys, time
import click
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when pytest runs in the background
from surgery.cli.main import cli, main
from surgery.io import atomic_output_dir

@cli.command("sleepy")
@click.argument("out")
def sleepy(out):
    with atomic_output_dir(out) as tmp:
        (tmp / "partial.bin").write_bytes(b"x" * 1000)
        print("ready", file=sys.stderr, flush=True)
        time.sleep(30)

main(["sleepy", sys.argv[1]])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_write_exits_130_and_leaves_no_output(sig, tmp_path):
    out = tmp_path / "out"
    p = run_python(SLEEPY, out)
    assert p.stderr.readline().strip() == "ready"
    assert list(tmp_path.glob(".out.surgery-tmp-*")), "the control: a temporary directory exists mid-write"
    p.send_signal(sig)
    stderr = p.stderr.read()
    p.wait(timeout=60)
    check_interrupted(p, stderr)
    assert not out.exists() and list(tmp_path.iterdir()) == []


STARTUP_INTERRUPTS = {
    # Ctrl-C while a command module (and so torch) is being imported
    "command-import": """
from surgery.cli.commands import CommandEntry
from surgery.cli.main import cli, main
cli.commands.table["slow"] = CommandEntry("interrupted_module:cmd", "Interrupted while importing.")
main(["slow"])
""",
    # Ctrl-C while click parses the group's own options
    "group-parsing": """
import click
from surgery.cli.main import main
def parse_args(self, ctx, args):
    raise KeyboardInterrupt
click.Group.parse_args = parse_args
main(["inspect", "x"])
""",
    # Ctrl-C before click runs at all
    "before-click": """
from surgery.cli import main as m
def interrupted(*a, **k):
    raise KeyboardInterrupt
m.cli.main = interrupted
m.main(["inspect", "x"])
""",
    # Ctrl-C while `python -m surgery` is still importing the CLI
    "python-m-import": """
import runpy, sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "surgery.cli.main":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
runpy.run_module("surgery", run_name="__main__")
""",
}


@pytest.mark.parametrize("where", sorted(STARTUP_INTERRUPTS))
def test_interrupt_during_start_up_is_one_line(where, tmp_path):
    (tmp_path / "interrupted_module.py").write_text("raise KeyboardInterrupt\n")
    p = run_python(STARTUP_INTERRUPTS[where], cwd=tmp_path)
    stdout, stderr = p.communicate(timeout=60)
    check_interrupted(p, stderr)
    assert stdout == ""
