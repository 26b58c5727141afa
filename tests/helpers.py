"""Plain helper functions shared by the tests (fixtures live in conftest.py).

Import them as `from helpers import ...`: pyproject.toml puts tests/ on pytest's pythonpath.
"""

from __future__ import annotations

import errno
import json
import os
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


class FullDisk:
    """`open` for surgery.io.writer: files opened for writing accept `budget` bytes in all,
    then raise ENOSPC, on write or (close_fails) on the flush at close."""

    def __init__(self, budget: int, close_fails: bool = False):
        self.left, self.close_fails, self.hit = budget, close_fails, False

    def __call__(self, file, mode="r", *a, **k):
        f = open(file, mode, *a, **k)
        if not any(c in mode for c in "wax+"):
            return f
        disk = self

        class _F:
            name = f.name

            def __getattr__(self, attr):
                return getattr(f, attr)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()

            def write(self, b):
                n = memoryview(b).nbytes
                if n > disk.left and not disk.close_fails:
                    disk.hit = True
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.left -= n
                return f.write(b)

            def close(self):
                f.close()
                if disk.close_fails and disk.left < 0 and not disk.hit:
                    disk.hit = True
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return _F()


def copy_export_editing(src: Path, dst: Path, pick: Any, edit: Any) -> str:
    """Copy the export directory SRC to DST with one initializer of model.onnx changed (a negative
    control): `pick(initializers)` chooses it, `edit(array)` returns its new value. Returns its name."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src / "model.onnx"))
    target = pick(list(proto.graph.initializer))
    target.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(target).copy()), target.name))
    dst.mkdir()
    for p in src.iterdir():
        if p.name != "model.onnx":
            (dst / p.name).write_bytes(p.read_bytes())
    onnx.save_model(proto, str(dst / "model.onnx"))
    return target.name
