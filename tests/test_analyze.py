"""surgery.ops.analyze: spectra, stable / effective rank, energy curves, delta analysis, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery.cli.main import cli
from surgery.core.lowrank import allocate_budget
from surgery.errors import CheckpointError, OptionError
from surgery.ops.analyze import analyze, effective_rank, layer_type, spectrum, spectrum_stats


def _with_spectrum(S, m, n, seed=0):
    """An (m, n) matrix with singular values S (len ≤ min(m, n))."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(S), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(S), generator=g, dtype=torch.float64)).Q
    return (U * torch.as_tensor(S, dtype=torch.float64)) @ V.T


# ----------------------------------------------------------------------------- definitions


def test_effective_rank_definition():
    assert effective_rank(torch.tensor([3.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)  # zeros carry no entropy
    # Roy & Vetterli use p_i = σ_i / Σσ (not σ² / Σσ²): the two differ on a non-flat spectrum
    s = torch.tensor([4.0, 2.0, 1.0])
    p = s / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    p2 = s**2 / (s**2).sum()
    assert effective_rank(s) != pytest.approx(math.exp(-(p2 * p2.log()).sum().item()), rel=1e-3)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_stats_of_a_known_spectrum():
    S = [5.0, 3.0, 2.0, 1.0, 0.5]
    M = _with_spectrum(S, 12, 9).float()
    st_ = spectrum_stats(spectrum(M), [1, 2, 5, 20], [0.9, 0.99])
    total = sum(s * s for s in S)
    assert st_.norm == pytest.approx(math.sqrt(total), rel=1e-5)
    assert st_.stable_rank == pytest.approx(total / 25.0, rel=1e-4)
    assert st_.energy[1] == pytest.approx(25.0 / total, rel=1e-4)
    assert st_.energy[2] == pytest.approx(34.0 / total, rel=1e-4)
    assert st_.energy[5] == pytest.approx(1.0, abs=1e-6)  # exact at full rank
    assert st_.energy[20] == pytest.approx(1.0, abs=1e-6)  # beyond min(m, n): everything
    assert st_.rank_for_energy == {"0.9": 3, "0.99": 4}  # 38/39.25 = 0.968, 39/39.25 = 0.9936
    assert st_.method == "exact" and st_.spectrum_complete
    # negative control: a different spectrum gives different numbers
    other = spectrum_stats(spectrum(_with_spectrum([5, 5, 5, 5, 5], 12, 9).float()), [1])
    assert other.energy[1] == pytest.approx(0.2, rel=1e-4) and other.energy[1] != pytest.approx(st_.energy[1])


@settings(max_examples=20, deadline=None)
@given(m=st.integers(2, 40), n=st.integers(2, 40), seed=st.integers(0, 10_000))
def test_energy_curve_monotone_and_exact_at_full_rank(m, n, seed):
    M = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    ranks = list(range(1, min(m, n) + 1))
    s = spectrum_stats(spectrum(M), ranks, [0.5, 0.9, 0.999])
    curve = [s.energy[r] for r in ranks]
    assert all(b >= a - 1e-7 for a, b in zip(curve, curve[1:]))
    assert curve[-1] == pytest.approx(1.0, abs=1e-6)
    assert 1.0 - 1e-6 <= s.stable_rank <= min(m, n) + 1e-4
    assert 1.0 - 1e-6 <= s.effective_rank <= min(m, n) + 1e-4
    r50, r90 = s.rank_for_energy["0.5"], s.rank_for_energy["0.9"]
    assert r50 <= r90 and s.energy[r90] >= 0.9 - 1e-6
    if r90 > 1:
        assert s.energy[r90 - 1] < 0.9 + 1e-6  # smallest such rank


def test_randomized_path_energies_exact_effective_rank_partial():
    S = torch.logspace(0, -2, 64)
    M = _with_spectrum(S, 200, 96, seed=3).float()
    exact = spectrum_stats(spectrum(M), [4, 16])
    approx = spectrum_stats(spectrum(M, exact_max=32, cap=24), [4, 16], [0.9])
    assert approx.method == "randomized" and approx.k == 24 and not approx.spectrum_complete
    for r in (4, 16):
        assert approx.energy[r] == pytest.approx(exact.energy[r], abs=1e-4)
    assert approx.stable_rank == pytest.approx(exact.stable_rank, rel=1e-4)
    # effective rank from the top 24 values only: smaller than the full one (the tail is missing)
    assert approx.effective_rank < exact.effective_rank - 1.0
    # a threshold beyond the computed values is reported as None ("> k"), not as a wrong rank
    tail = spectrum_stats(spectrum(M, exact_max=32, cap=4), [1], [0.999])
    assert tail.rank_for_energy["0.999"] is None


def test_layer_type_groups_blocks():
    assert layer_type("model.layers.11.self_attn.q_proj") == "model.layers.*.self_attn.q_proj"
    assert layer_type("encoder.layer.0.output.dense") == "encoder.layer.*.output.dense"
    assert layer_type("transformer.h.3.mlp.c_fc") == "transformer.h.*.mlp.c_fc"
    assert layer_type("lm_head") == "lm_head"


# ----------------------------------------------------------------------------- checkpoints


def test_analyze_weights_of_tiny_bert(tiny_bert):
    res = analyze(tiny_bert, ranks=[4, 32])
    names = {m.module for m in res.modules}
    assert "encoder.layer.0.attention.self.query" in names and "embeddings.word_embeddings" in names
    assert not any("LayerNorm" in n for n in names)  # only matrices
    q = next(m for m in res.modules if m.module == "encoder.layer.0.attention.self.query")
    assert q.weight.shape == (32, 32) and q.weight.energy[32] == pytest.approx(1.0, abs=1e-6)
    assert q.delta is None and "exact when" in res.method_note and "Roy & Vetterli" in res.effective_rank_definition


def test_analyze_delta_of_tiny_bert(tiny_bert, tiny_bert_ft):
    # make_ft_twin adds a rank-4 delta of 5% of ‖W‖ plus 0.1% dense noise
    res = analyze(tiny_bert_ft, tiny_bert, ranks=[2, 4, 8], budget="5%")
    lin = [m for m in res.modules if m.kind == "linear"]
    for m in lin:
        assert m.rel_change == pytest.approx(0.05, rel=0.05)
        assert m.delta.energy[4] > 0.999 and m.delta.energy[2] < 0.95
        assert m.delta.rank_for_energy["0.99"] == 4
    # the recommended ranks are the allocator's on the delta spectra, within the budget
    assert res.budget == int(res.model_params * 0.05) and res.budget_used <= res.budget
    spectra = {m.module: (torch.tensor(m.delta.singular_values), *m.delta.shape) for m in res.modules}
    assert allocate_budget(spectra, res.budget) == {m.module: m.recommended_rank for m in res.modules}


def test_rank_budget_matches_extract(tiny_bert, tiny_bert_ft, tmp_path):
    """analyze --budget r2 recommends what extract-lora --budget r2 writes (same count, same allocator)."""
    from surgery.ops.extract import extract_lora

    res = analyze(tiny_bert_ft, tiny_bert, ranks=[2], budget="r2", exact_max=4096)
    changed = [m for m in res.modules if m.delta.norm > 0]
    assert res.budget == sum(min(2, *m.delta.shape) * sum(m.delta.shape) for m in changed)
    assert res.budget_used <= res.budget and len({m.recommended_rank for m in changed}) > 1
    ex = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", budget="r2", svd="exact")
    assert {m.module: m.rank for m in ex.modules} == {m.module: m.recommended_rank for m in res.modules
                                                       if m.recommended_rank}


def test_delta_against_itself_is_zero_negative_control(tiny_bert):
    res = analyze(tiny_bert, tiny_bert, ranks=[2], include=["pooler"])
    (m,) = res.modules
    assert m.rel_change == 0.0 and m.delta.norm == 0.0 and m.delta.rank_for_energy["0.9"] == 0


def test_analyze_bf16_sharded_and_conv1d(tiny_llama, tiny_llama_ft, tiny_gpt2):
    res = analyze(tiny_llama_ft, tiny_llama, ranks=[4], include=[r"layers\.0\.mlp"])
    assert len(res.modules) == 3 and all(m.delta.energy[4] > 0.99 for m in res.modules)
    g = analyze(tiny_gpt2, ranks=[4], include=["c_attn"])
    assert all(m.kind == "conv1d" and m.weight.shape == (96, 32) for m in g.modules)  # oriented (out, in)


def test_analyze_errors(tiny_bert, tiny_gpt2, tiny_bert_lora):
    with pytest.raises(OptionError, match="give a base model"):
        analyze(tiny_bert, budget="1%")
    with pytest.raises(OptionError, match="matches no"):
        analyze(tiny_bert, include=["nosuch"])
    with pytest.raises(OptionError, match="ranks"):
        analyze(tiny_bert, ranks=[0])
    with pytest.raises(CheckpointError, match="adapter directory"):
        analyze(tiny_bert_lora)
    with pytest.raises(CheckpointError, match="architecture"):
        analyze(tiny_bert, tiny_gpt2)


def test_minilm_delta_analysis(minilm_dir, minilm_ft):
    res = analyze(minilm_ft, minilm_dir, ranks=[4, 8, 64], include=[r"encoder\.layer\.0\."], budget="1%")
    assert len(res.modules) == 6
    for m in res.modules:
        assert m.delta.rank_for_energy["0.9"] <= 4 and m.delta.energy[8] > 0.99
        assert m.weight.effective_rank > 50  # a real trained weight: far from low rank
        assert m.weight.energy[64] < m.weight.energy[8] + 1 and m.weight.energy[8] < 0.5


# ----------------------------------------------------------------------------- CLI


def test_cli_table_json_and_plot(tiny_bert, tiny_bert_ft, tmp_path):
    r = CliRunner().invoke(cli, ["analyze", str(tiny_bert_ft), "--base", str(tiny_bert), "--ranks", "2,4",
                                 "--budget", "3%", "-q"])
    assert r.exit_code == 0, r.output
    assert "r for 90%" in r.stdout and "recommended r" in r.stdout and "encoder.layer.1.output.dense" in r.stdout
    assert "randomized" in r.stdout  # the SVD policy is stated
    r = CliRunner().invoke(cli, ["analyze", str(tiny_bert), "--json", "-q", "--plot", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["ranks"] == [8, 16, 32, 64] and len(data["modules"]) == 16
    assert data["modules"][0]["weight"]["singular_values"]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(cli, ["analyze", str(tiny_bert), "-q", "--plot", str(tmp_path / "s.png")])
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = CliRunner().invoke(cli, ["analyze", str(tiny_bert), "-q", "--plot", str(tmp_path / "s.txt")])
    assert r.exit_code == 2 and ".png" in r.stderr and "--plot" in r.stderr  # a usage error naming the flag


def test_cli_bad_input(tiny_bert, tmp_path):
    r = CliRunner().invoke(cli, ["analyze", str(tiny_bert), "--ranks", "8,x"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, ["analyze", str(tiny_bert), "--budget", "2%"])
    assert r.exit_code == 1 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["analyze", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "Traceback" not in r.output


def test_plot_without_matplotlib_is_one_line(tiny_bert, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    r = CliRunner().invoke(cli, ["analyze", str(tiny_bert), "-q", "--include", "pooler", "--plot",
                                 str(tmp_path / "p.png")])
    assert r.exit_code == 1 and "matplotlib" in r.stderr and "surgery[plot]" in r.stderr
    assert not (tmp_path / "p.png").exists()
