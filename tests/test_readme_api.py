"""The README's Python API section runs as written (from the repository root)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_block_runs(capsys) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "README has no python block in its API section"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(block.group(1), "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out.split()
    assert out[0] == "model" and "ok" in out and "adapter" in out[-1]


def test_public_api_names_resolve() -> None:
    import surgery

    for name in surgery.__all__:
        assert getattr(surgery, name) is not None, name
