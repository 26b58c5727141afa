"""Model cards: the README.md every output directory carries, with the Hugging Face Hub's YAML header.

The card says what the directory is, what produced it (the operation and its options, by
field name) and how good it is (the error / energy summary). It holds no time stamp and no
output path: the same inputs give a byte-identical card.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from surgery.errors import OutputError

__all__ = ["write_card", "render_card", "options_dict", "read_card_kind", "CARD_NAME", "LIBRARIES"]

CARD_NAME = "README.md"

#: the Hub's library_name for each kind of output
LIBRARIES = {"extract-lora": "peft", "init-lora": "peft", "refine": "peft", "factorize": "transformers",
             "merge": "transformers", "export-onnx": "onnx"}

_WHAT = {
    "extract-lora": "a PEFT LoRA adapter extracted from the difference between a fine-tune and its base "
                    "(truncated SVD of each weight delta)",
    "init-lora": "a LoRA initialisation: `adapter/` (PEFT) and `residual/` (the model minus the adapter's part); "
                 "`PeftModel.from_pretrained(residual, adapter)` computes the original model",
    "refine": "a PEFT LoRA adapter whose factors were trained to imitate a teacher model",
    "factorize": "a model whose Linear weights are replaced by two low-rank factors; load it with "
                 "`surgery.ops.factorize.load_factorized(path)` (see factorization.json)",
    "merge": "a model with a LoRA adapter merged into its weights",
    "export-onnx": "an ONNX export (see manifest.json)",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _yaml(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)  # a JSON scalar is a YAML scalar


def _cell(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def render_card(kind: str, base: str | None, options: Mapping[str, Any], summary: Mapping[str, Any],
                library: str | None = None, tags: Iterable[str] = ()) -> str:
    """The text of a model card (see write_card for the arguments).

    Example:
        >>> print(render_card("factorize", "org/model", {"rank": 8}, {"params saved": "27.9%"}).splitlines()[1])
        base_model: "org/model"
    """
    lib = library or LIBRARIES.get(kind, "transformers")
    head = ["---"]
    if base and _HUB_ID.match(base) and not Path(base).exists():
        head.append(f"base_model: {_yaml(base)}")
    head.append(f"library_name: {_yaml(lib)}")
    head.append("tags:")
    head += [f"- {_yaml(t)}" for t in dict.fromkeys(["surgery", kind, *tags])]
    head.append("---")
    body = [f"# {kind} output", "", f"This directory is {_WHAT.get(kind, 'written by surgery')}.", "",
            f"Made by `surgery {kind}` (the surgery model-surgery toolkit)"
            + (f" from the base model `{base}`." if base else "."), "", "## Options", "",
            "| option | value |", "| --- | --- |"]
    body += [f"| {_cell(k)} | {_cell(v)} |" for k, v in options.items() if v not in (None, [], ())]
    body += ["", "## Result", "", "| measure | value |", "| --- | --- |"]
    body += [f"| {_cell(k)} | {_cell(v)} |" for k, v in summary.items()]
    return "\n".join(head + [""] + body) + "\n"


def options_dict(opts: Any, drop: Iterable[str] = ("overwrite", "threads", "device")) -> dict[str, Any]:
    """An Options object's fields for a card (machine-specific ones dropped; tuples as lists), as its
    to_json() gives them when it has one (refine's calibration samples become "(N samples)", never
    the texts themselves)."""
    import dataclasses

    skip = set(drop)
    shown = opts.to_json() if callable(getattr(opts, "to_json", None)) else {}
    return {f.name: shown[f.name] if f.name in shown else list(v) if isinstance(v := getattr(opts, f.name), tuple)
            else v for f in dataclasses.fields(opts) if f.name not in skip}


def write_card(out_dir: str | Path, kind: str, base: str | None, options: Mapping[str, Any],
               summary: Mapping[str, Any], *, inputs: Iterable[str | Path] = (), library: str | None = None,
               tags: Iterable[str] = ()) -> Path:
    """Write OUT_DIR/README.md atomically (a temporary sibling, then a rename).

    Call it on the output's temporary directory before its rename when the writer gives one
    (then the card is part of the atomic output), else on the finished output.

    Args:
        out_dir: the output directory (it must exist).
        kind: what produced it: "extract-lora", "init-lora", "factorize", "merge", "export-onnx", ...
        base: the base model (a Hub id becomes the YAML `base_model`; a local path is named in the text).
        options: the options in force, by field name (None / empty values are left out).
        summary: the error / energy summary, measure -> value (no timings: cards are reproducible).
        inputs: the checkpoints the command read: the card is never written into one of them.
        library: the Hub's library_name (default: by kind, LIBRARIES).
        tags: extra tags beside "surgery" and the kind.

    Returns:
        The card's path.

    Raises:
        OutputError: OUT_DIR is (inside) an input, or the card cannot be written.

    Example:
        >>> write_card("out/fact", "factorize", "org/model", {"rank": 8}, {"parameters saved": "27.9%"})
        PosixPath('out/fact/README.md')
    """
    from surgery.io import escape_name

    d = Path(out_dir)
    rd = d.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        if rd == ri or (ri.is_dir() and rd.is_relative_to(ri)):
            raise OutputError(f"model card: {escape_name(d)} is inside the input {escape_name(inp)}; not written")
    path = d / CARD_NAME
    tmp = d / f".{CARD_NAME}.surgery-tmp-{os.getpid()}"
    try:
        tmp.write_text(render_card(kind, base, options, summary, library, tags), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write the model card {escape_name(path)} ({e.strerror or e})") from None
    return path


def read_card_kind(directory: str | Path) -> str | None:
    """The surgery kind a directory's model card names ("merge", "extract-lora", ...), or None when it
    has no card, or a card surgery did not write (its YAML tags lack "surgery").

    Example:
        >>> read_card_kind("out/merged")
        'merge'
    """
    p = Path(directory) / CARD_NAME
    try:
        with open(p, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith("---"):
        return None
    yaml = head.split("\n---", 1)[0]
    tags = [t.strip().strip('"') for t in re.findall(r"^- (.+)$", yaml, flags=re.M)]
    if "surgery" not in tags:
        return None
    return next((t for t in tags if t in LIBRARIES), "surgery")
