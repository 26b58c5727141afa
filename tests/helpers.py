"""Plain helper functions shared by the tests (fixtures live in conftest.py).

Import them as `from helpers import ...`: pyproject.toml puts tests/ on pytest's pythonpath.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import stat
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


def calibration_texts(n: int, seed: int) -> list[str]:
    """Sentences of words every tiny tokenizer knows (bert's vocabulary is WORDS[:90])."""
    from fixtures.make_fixtures import WORDS

    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS[5:90]) for _ in range(rnd.randint(4, 14))) for _ in range(n)]


def write_calibration(directory: Path, n: int, seed: int) -> Path:
    """DIRECTORY/calib.txt holding calibration_texts(n, seed), one per line."""
    p = directory / "calib.txt"
    p.write_text("\n".join(calibration_texts(n, seed)) + "\n")
    return p


def raises_one_line(exc_type: Any, fn: Any, needle: str | None = None) -> str:
    """fn() raises exc_type with a one-line message (no CR/LF, no escape), matching `needle`; the message."""
    with pytest.raises(exc_type) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg, msg
    if needle:
        assert re.search(needle, msg), msg
    return msg


def tree_state(*roots: Path, mtime: bool = False) -> dict[str, str]:
    """What every entry under the roots is, without following links or opening special files: link
    targets, content hashes of regular files ("sparse" past 1 GiB; with mtime, the mtime too), "dir",
    "special:<type>"."""
    out = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")]) if root.is_dir() and not root.is_symlink() else [root]:
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                out[str(p)] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st_.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st_.st_size < 2**30 else "sparse"
                out[str(p)] = digest + (f":{st_.st_mtime_ns}" if mtime else "")
            elif stat.S_ISDIR(st_.st_mode):
                out[str(p)] = "dir"
            else:
                out[str(p)] = f"special:{stat.S_IFMT(st_.st_mode)}"
    return out


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """Torch at one thread for a whole test module (import it as a fixture there): tiny models are
    faster on one thread, and on a loaded 2-core machine far faster (no spinning)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
