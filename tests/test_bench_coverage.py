"""The export coverage set of bench/bench_coverage.py: at least 40 architecture x head rows, each
model builds from its transformers config (no export here: the bench runs those)."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

from fixtures.zoo_extra import EXTRA, entry, make_extra

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_coverage.py"
_spec = importlib.util.spec_from_file_location("bench_coverage", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_coverage"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)


def test_coverage_set_has_40_distinct_rows():
    names = [r.name for r in bench.ROWS]
    assert len(names) >= 40
    assert len(set(names)) == len(names)
    assert {r.kind for r in bench.ROWS} == {"", "seq2seq", "moe"}


def test_rows_name_tasks_the_cli_accepts():
    from surgery.options.export import TASKS

    assert {r.ours for r in bench.ROWS} <= set(TASKS)


@pytest.mark.parametrize("row", bench.ROWS, ids=lambda r: r.name)
def test_row_model_builds(row):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_extra(row.model)
    assert sum(p.numel() for p in model.parameters()) < 200_000  # tiny: the bench times the tools, not the size
    assert type(model).__name__ == entry(row.model)[0]
    heads = bench.expected_head(row.model, row.ours)
    assert heads and all(d is None or d > 0 for d in heads.values())


def test_head_check_catches_a_dropped_or_resized_head():
    assert bench.head_intact({"logits": ["batch", 3]}, {"logits": 3}) == "yes"
    assert bench.head_intact({"last_hidden_state": ["batch", "sequence", 32]}, {"logits": 3}) == "no logits"
    assert bench.head_intact({"logits": ["batch", 96]}, {"logits": 3}) == "logits[-1]=96, head 3"


def test_unknown_row_model_is_refused():
    assert "not-a-model" not in EXTRA
    with pytest.raises(KeyError):
        make_extra("not-a-model")
