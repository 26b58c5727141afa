"""Start-up cost of the CLI: help imports no heavy module, commands load lazily from the table.

`surgery --help` must import no command module at all, and `surgery CMD --help` must not
import torch, transformers, onnx, onnxruntime, peft or surgery's heavy layers (ops, onnx,
core): they cost seconds. Each case runs in a fresh interpreter and reads `sys.modules`
after the help was printed (timing itself is measured in bench/, not asserted here).
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import surgery.cli.commands as commands_pkg
from surgery.cli.commands import COMMANDS, CommandEntry
from surgery.cli.main import SurgeryGroup, cli, load_command

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "peft", "surgery.ops", "surgery.onnx", "surgery.core")

# Runs the CLI's help in-process, then prints which modules got imported.
PROBE = """
import json, sys
from surgery.cli.main import cli
try:
    cli.main(args=sys.argv[1:], prog_name="surgery")
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def modules_after(*args: str) -> tuple[int, set[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    report = json.loads(r.stderr.strip().splitlines()[-1])
    return report["code"], set(report["modules"])


def heavy(modules: set[str]) -> list[str]:
    """The HEAVY packages found, and surgery's own modules among them (to show who imported what)."""
    found = {h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in modules)}
    ours = {m for m in modules if any(m.startswith(h + ".") for h in found if h.startswith("surgery."))}
    return sorted(found | ours)


def test_group_help_imports_no_command_module():
    code, modules = modules_after("--help")
    assert code == 0
    assert heavy(modules) == []
    loaded = sorted(m for m in modules if m.startswith("surgery.cli.commands."))
    assert loaded == [], f"`surgery --help` imported {loaded}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_is_torch_free(name):
    code, modules = modules_after(name, "--help")
    assert code == 0
    assert heavy(modules) == [], f"`surgery {name} --help` imported {heavy(modules)}: move those imports " \
                                 "inside the command function"


def test_negative_control_the_probe_sees_torch():
    """The probe would notice an import: a module that imports torch is reported."""
    probe = PROBE.replace("from surgery.cli.main import cli", "import torch\nfrom surgery.cli.main import cli")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", probe, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert "torch" in heavy(set(json.loads(r.stderr.strip().splitlines()[-1])["modules"]))


def test_group_help_lists_every_command_with_its_table_line():
    r = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert r.exit_code == 0
    for name, entry in COMMANDS.items():
        assert f"  {name}" in r.output
        assert entry.short_help in r.output, f"{name}'s help line wraps or is missing:\n{r.output}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_table_entry_loads_the_named_command(name):
    entry = COMMANDS[name]
    cmd = load_command(entry.target)
    assert isinstance(cmd, click.Command) and cmd.name == name
    assert cli.get_command(None, name) is cmd
    assert entry.short_help and "\n" not in entry.short_help and len(entry.short_help) <= 60


def test_every_command_module_is_in_the_table():
    """A *_cmd.py module that the table does not name would never run."""
    modules = {m.name for m in pkgutil.iter_modules(commands_pkg.__path__) if m.name.endswith("_cmd")}
    named = {e.target.partition(":")[0].rsplit(".", 1)[1] for e in COMMANDS.values()}
    assert modules == named


def test_lazy_commands_mapping_behaves_like_a_dict():
    """commands: names from the table, a lookup imports, added commands kept, unknown names absent."""
    table = {"inspect": COMMANDS["inspect"], "broken": CommandEntry("surgery.errors:SurgeryError", "not a command")}
    extra = click.Command("extra", help="Added directly.")
    group = SurgeryGroup("g", table=table, commands=[extra])
    assert list(group.commands) == group.list_commands(None) == ["broken", "extra", "inspect"]
    assert len(group.commands) == 3 and "inspect" in group.commands and "nope" not in group.commands
    assert group.get_command(None, "nope") is None and group.get_command(None, "extra") is extra
    assert group.get_command(None, "inspect") is load_command(COMMANDS["inspect"].target)
    with pytest.raises(TypeError, match="not a click command"):
        group.get_command(None, "broken")
    del group.commands["broken"]
    assert "broken" not in group.commands
    with pytest.raises(KeyError):
        del group.commands["broken"]
    r = CliRunner().invoke(group, ["--help"])
    assert r.exit_code == 0 and "Added directly." in r.output and COMMANDS["inspect"].short_help in r.output
    assert set(COMMANDS) <= set(cli.commands)
