"""Determinism: the same inputs, options and seed give byte-identical output files.

Each command runs twice into different directories (through the CLI, in process);
every file of the two outputs must match byte for byte. A different seed must
change the randomized outputs (negative control: the comparison can fail).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgery.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"


def run(args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def digest(d: Path) -> dict[str, str]:
    files = sorted(p for p in d.rglob("*") if p.is_file())
    assert files, f"{d} is empty"
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _cases():
    """(id, argv builder (out, seed)) for every command with a file output that exists."""
    cases = {
        "extract-exact": lambda o, s: ["extract-lora", FIX / "tiny-bert", FIX / "tiny-bert-ft", "-o", o, "--rank", "3",
                                       "--svd", "exact", "--seed", s, "-q"],
        "extract-randomized": lambda o, s: ["extract-lora", FIX / "tiny-llama", FIX / "tiny-llama-ft", "-o", o,
                                            "--rank", "3", "--svd", "randomized", "--niter", "1", "--seed", s, "-q"],
        "extract-budget": lambda o, s: ["extract-lora", FIX / "tiny-gpt2", FIX / "tiny-gpt2-ft", "-o", o,
                                        "--budget", "2%", "--svd", "randomized", "--seed", s, "-q"],
        "merge-sharded": lambda o, s: ["merge", FIX / "tiny-llama", FIX / "tiny-llama-lora", "-o", o,
                                       "--shard-size", "20KB", "--weight", "0.7"],
        "merge-two-dtype": lambda o, s: ["merge", FIX / "tiny-bert", FIX / "tiny-bert-lora", FIX / "tiny-bert-lora",
                                         "-o", o, "--weight", "0.5", "--weight", "0.25", "--dtype", "bf16"],
        "unmerge": lambda o, s: ["merge", FIX / "tiny-bert", FIX / "tiny-bert-lora", "-o", o, "--unmerge"],
        "init-lora-pissa": lambda o, s: ["init-lora", FIX / "tiny-bert", "-o", o, "--rank", "3", "--svd",
                                         "randomized", "--seed", s, "-q"],
        "init-lora-exact": lambda o, s: ["init-lora", FIX / "tiny-llama", "-o", o, "--rank", "2", "--svd", "exact",
                                         "--seed", s, "-q"],
        "init-adapter": lambda o, s: ["init-adapter", FIX / "tiny-bert", "-o", o, "--bottleneck", "3", "-q"],
        "factorize": lambda o, s: ["factorize", FIX / "tiny-bert", "-o", o, "--rank", "4", "-q", "--no-check"],
    }
    for name, build in cases.items():
        cmd = build(Path("x"), 0)[0]
        marks = [] if cmd in cli.commands else [pytest.mark.skip(reason=f"{cmd} is not registered")]
        yield pytest.param(name, build, marks=marks, id=name)


# Options that take a seed and use it (randomized SVD): a different seed must change the bytes.
SEEDED = {"extract-randomized", "init-lora-pissa"}


def _twice(build, out: Path, seed: int) -> tuple[dict, dict]:
    """Two runs into the same output path (outputs may legitimately record their own path)."""
    run(build(out, seed))
    first = digest(out)
    shutil.rmtree(out)
    run(build(out, seed))
    return first, digest(out)


@pytest.mark.parametrize("name,build", list(_cases()))
def test_byte_identical_outputs(name, build, tmp_path):
    a, b = _twice(build, tmp_path / "out", 7)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    assert not diff, diff
    if name in SEEDED:  # negative control: the seed reaches the randomized SVD, so it shows in the bytes
        shutil.rmtree(tmp_path / "out")
        run(build(tmp_path / "out", 8))
        c = digest(tmp_path / "out")
        assert c != a and set(c) == set(a)

