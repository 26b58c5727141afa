"""Plain helper functions shared by the tests (fixtures live in conftest.py).

Import them as `from helpers import ...`: pyproject.toml puts tests/ on pytest's pythonpath.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = ROOT / "fixtures"


def fixture_path(name: str) -> Path:
    """Path of a committed fixture directory; fails with the regeneration command if missing."""
    path = FIXTURES_DIR / name
    if not path.is_dir():
        pytest.fail(f"fixture {path} is missing; regenerate with `python fixtures/make_fixtures.py`")
    return path


def load_fp32_model(path: Path) -> Any:
    """The model class named in config.json's architectures, loaded in fp32, eval mode, quietly."""
    import torch
    import transformers

    cfg = json.loads((Path(path) / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cfg["architectures"][0]).from_pretrained(path, dtype=torch.float32).eval()
