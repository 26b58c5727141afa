"""The command table: every `surgery` command by name, imported only when it runs.

`surgery --help` lists the commands from this table alone and imports no command
module; `surgery CMD ...` imports just CMD's module (`module:attribute`, a click
command). A command module keeps torch, transformers and the library's heavy layers
(surgery.ops, surgery.onnx, surgery.core) out of its top level, so `surgery CMD --help`
stays fast too; tests/test_cli_startup.py checks both.

To add a command: write `surgery/cli/commands/NAME_cmd.py` defining a click command,
then add one row here (name, target, the one-line help shown by `surgery --help`, at most
60 characters so the list fits 80 columns).
"""

from __future__ import annotations

from typing import NamedTuple


class CommandEntry(NamedTuple):
    """Where a command lives and what `surgery --help` says about it."""

    target: str  # "package.module:attribute", the attribute being a click.Command
    short_help: str


COMMANDS: dict[str, CommandEntry] = {
    "analyze": CommandEntry("surgery.cli.commands.analyze_cmd:analyze_cmd",
                            "Spectra of every matrix (and of a delta MODEL - BASE)."),
    "demo": CommandEntry("surgery.cli.commands.demo_cmd:demo_cmd",
                         "Extract, merge, export and validate, end to end."),
    "export-onnx": CommandEntry("surgery.cli.commands.export_cmd:export_cmd",
                                "Export a model to ONNX and validate it against PyTorch."),
    "extract-lora": CommandEntry("surgery.cli.commands.extract_cmd:extract_cmd",
                                 "Compress the delta FT - BASE into a PEFT LoRA adapter."),
    "factorize": CommandEntry("surgery.cli.commands.factorize_cmd:factorize_cmd",
                              "Replace Linear weights by low-rank factors where that saves."),
    "init-adapter": CommandEntry("surgery.cli.commands.init_cmd:init_adapter_cmd",
                                 "SVD-initialised bottleneck adapters (Houlsby) for MODEL."),
    "init-lora": CommandEntry("surgery.cli.commands.init_cmd:init_lora_cmd",
                              "LoRA from MODEL's own weights (PiSSA / MiLoRA / OLoRA)."),
    "inspect": CommandEntry("surgery.cli.commands.inspect_cmd:inspect_cmd",
                            "What is in a checkpoint, from headers only (no tensor data)."),
    "merge": CommandEntry("surgery.cli.commands.merge_cmd:merge_cmd",
                          "Fold LoRA adapters into a base model (or out, --unmerge)."),
    "refine": CommandEntry("surgery.cli.commands.refine_cmd:refine_cmd",
                           "Train LoRA factors so that BASE + ADAPTER imitates TEACHER."),
}
