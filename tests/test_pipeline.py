"""The main job end to end (surgery demo): extract -> merge -> export -> validate."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from surgery.cli.main import cli
from surgery.ops.pipeline import run_pipeline


@pytest.fixture(scope="module")
def demo_report(tiny_bert, tiny_bert_ft, tmp_path_factory):
    return run_pipeline(tiny_bert, tiny_bert_ft, tmp_path_factory.mktemp("demo"), rank=4)


def test_merged_weights_reproduce_ft_to_the_reported_error(demo_report):
    ex, mg = demo_report["extract"], demo_report["merge"]
    reported = ex["overall_rel_error"]
    measured = mg["weights_vs_ft"]["rel_error"]
    assert 0 < reported < 0.05
    assert measured == pytest.approx(reported, rel=1e-3)
    # negative control: a different rank's error is detectably different
    assert abs(measured - 2 * reported) > 1e-3


def test_merged_outputs_close_to_ft_and_base_far(demo_report):
    o = demo_report["merge"]["outputs_vs_ft"]
    assert o["merged_vs_ft_max_abs"] < 1e-3
    assert o["base_vs_ft_max_abs"] > 100 * o["merged_vs_ft_max_abs"]  # the control really differs


def test_export_validated(demo_report):
    exp = demo_report["export"]
    assert exp["status"] == "ok" and exp["exporter"] == "legacy"  # auto: legacy first, gated
    assert len(exp["validation"]) >= 3 and all(r["passed"] for r in exp["validation"])
    assert "CPU" in exp["provider_note"] or exp["provider"] == "CUDAExecutionProvider"


def test_demo_cli(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path / "d"), "--no-optimize"])
    assert r.exit_code == 0, r.output
    assert "1. extract-lora" in r.output and "4. validation    ok" in r.output
    r = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path / "d"), "--no-optimize", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.output[r.output.index("{"):])["export"]["status"] == "ok"


def test_demo_needs_both_paths(tiny_bert):
    r = CliRunner().invoke(cli, ["demo", str(tiny_bert)])
    assert r.exit_code == 2 and "both BASE and FT" in r.output
