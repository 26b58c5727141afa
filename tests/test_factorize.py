"""surgery.ops.factorize: low-rank factorised Linear/Conv1D layers, loader, output check, ONNX export."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery.cli.main import cli
from surgery.errors import CheckpointError, OptionError, OutputError
from surgery.ops.factorize import factorize, last_hidden, load_factorized, sample_inputs, savings

transformers = pytest.importorskip("transformers")
from helpers import load_fp32_model  # noqa: E402

_load = load_fp32_model


@pytest.fixture
def lowrank_bert(tiny_bert, tmp_path):
    """tiny-bert with every Linear weight truncated to rank 4 (so rank-4 factors are exact)."""
    out = tmp_path / "lowrank-bert"
    shutil.copytree(tiny_bert, out)
    sd = load_file(out / "model.safetensors")
    for k, t in sd.items():
        if k.endswith(".weight") and t.dim() == 2 and "embeddings" not in k:
            U, S, Vh = torch.linalg.svd(t.double(), full_matrices=False)
            sd[k] = ((U[:, :4] * S[:4]) @ Vh[:4]).float().contiguous()
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_savings_formula():
    assert savings(8, 32, 32) == pytest.approx(0.5)
    assert savings(16, 32, 32) == 0.0
    assert savings(8, 64, 32) == pytest.approx(1 - 8 * 96 / 2048)


def test_exact_at_the_true_rank(lowrank_bert, tmp_path):
    res = factorize(lowrank_bert, tmp_path / "f", rank=4)
    assert len(res.modules) == 13 and all(m.rel_error < 1e-5 for m in res.modules)
    assert res.params_saved == sum(m.params_before - m.params_after for m in res.modules)
    assert res.params_after == res.params_before - res.params_saved
    oc = res.output_check
    assert oc["max_abs_diff"] < 1e-4 and oc["cosine_min"] > 0.99999
    fac = load_factorized(tmp_path / "f")
    q = fac.get_submodule("encoder.layer.0.attention.self.query")
    assert isinstance(q, torch.nn.Sequential) and q[0].weight.shape == (4, 32) and q[1].bias is not None
    # negative control: rank 2 is lossy for a rank-4 weight
    res2 = factorize(lowrank_bert, tmp_path / "f2", rank=2)
    assert min(m.rel_error for m in res2.modules) > 0.05 and res2.output_check["max_abs_diff"] > 1e-2


def test_eckart_young_and_checkpoint_layout(tiny_bert, tmp_path):
    res = factorize(tiny_bert, tmp_path / "f", rank=8, evaluate=False)
    assert res.output_check is None
    sd = load_file(tmp_path / "f" / "model.safetensors")
    orig = load_file(tiny_bert / "model.safetensors")
    for m in res.modules:
        W = orig[m.module + ".weight"]
        A, B = sd[m.module + ".0.weight"], sd[m.module + ".1.weight"]  # (r, in), (out, r)
        assert m.module + ".weight" not in sd and torch.equal(sd[m.module + ".1.bias"], orig[m.module + ".bias"])
        S = torch.linalg.svdvals(W.double())
        best = S[8:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt()  # Eckart–Young optimum
        assert m.rel_error == pytest.approx(float(best), rel=1e-4)
        assert float((W - B @ A).norm() / W.norm()) == pytest.approx(m.rel_error, rel=1e-4)
    meta = json.loads((tmp_path / "f" / "factorization.json").read_text())
    assert meta["format"] == "surgery-factorized" and meta["modules"]["pooler.dense"]["rank"] == 8
    assert torch.equal(sd["embeddings.word_embeddings.weight"], orig["embeddings.word_embeddings.weight"])


def test_min_savings_keeps_layers_dense(tiny_bert, tmp_path):
    # rank 12: 32x32 saves 25%, 64x32 / 32x64 save 43.75%
    res = factorize(tiny_bert, tmp_path / "f", rank=12, min_savings=0.3, evaluate=False)
    assert {m.shape for m in res.modules} == {(64, 32), (32, 64)} and len(res.modules) == 4
    assert len(res.skipped) == 9 and all("min_savings" in s["why"] for s in res.skipped)
    with pytest.raises(OptionError, match="would be factorised"):
        factorize(tiny_bert, tmp_path / "g", rank=20)  # 32x32 grows, 64x32 saves 6% < 20%
    assert not (tmp_path / "g").exists()


def test_energy_policy_and_bias_order(tiny_gpt2, tmp_path):
    # GPT-2 Conv1D: weights (in, out); biases come before weights in the file
    res = factorize(tiny_gpt2, tmp_path / "f", energy=0.5, min_savings=0.1)
    assert res.modules and all(m.kind == "conv1d" and m.energy_kept >= 0.5 for m in res.modules)
    sd = load_file(tmp_path / "f" / "model.safetensors")
    for m in res.modules:
        assert (m.module + ".1.bias") in sd and (m.module + ".bias") not in sd
    for s in res.skipped:
        assert (s["module"] + ".bias") in sd  # kept dense: bias under its own name
    assert "max_abs_diff" in res.output_check and res.output_check["cosine_mean"] > 0.5


def test_bf16_llama(tiny_llama, tmp_path):
    res = factorize(tiny_llama, tmp_path / "f", rank=8, include=["mlp"])
    assert len(res.modules) == 6 and "lm_head" not in {m.module for m in res.modules}
    idx = json.loads((tmp_path / "f" / "factorization.json").read_text())
    assert set(idx["modules"]) == {m.module for m in res.modules}
    fac = load_factorized(tmp_path / "f")
    assert fac.get_submodule("model.layers.0.mlp.up_proj")[0].weight.dtype == torch.float32
    assert res.output_check["cosine_mean"] > 0.5


def test_minilm_ffn_factorisation(minilm_dir, tmp_path):
    res = factorize(minilm_dir, tmp_path / "f", rank=128, include=[r"layer\.[0-5]\.(intermediate|output)\.dense"])
    assert len(res.modules) == 12
    assert res.params_saved == 12 * (384 * 1536 - 128 * (384 + 1536))
    oc = res.output_check
    assert 0.5 < oc["cosine_mean"] < 1.0 and oc["max_abs_diff"] > 0


def test_errors_and_cli(tiny_bert, tiny_bert_lora, tmp_path):
    with pytest.raises(OptionError, match="exactly one"):
        factorize(tiny_bert, tmp_path / "f", rank=4, energy=0.9)
    with pytest.raises(CheckpointError, match="adapter directory"):
        factorize(tiny_bert_lora, tmp_path / "f", rank=4)
    r = CliRunner().invoke(cli, ["factorize", str(tiny_bert), "-o", str(tmp_path / "f"), "--rank", "4",
                                 "--include", "pooler", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["params_saved"] == 32 * 32 - 4 * 64
    r = CliRunner().invoke(cli, ["factorize", str(tiny_bert), "-o", str(tmp_path / "f"), "--rank", "4", "-q"])
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = CliRunner().invoke(cli, ["factorize", str(tiny_bert), "-o", str(tmp_path / "g"), "-q"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, ["factorize", str(tiny_bert), "-o", str(tmp_path / "g"), "--rank", "4",
                                 "--no-check", "-q"])
    assert r.exit_code == 0 and "--no-check" in r.stdout and "saved" in r.stdout
    (tmp_path / "g" / "factorization.json").write_text("{}")
    with pytest.raises(CheckpointError, match="factorization.json"):
        load_factorized(tmp_path / "g")
    with pytest.raises(OutputError):
        factorize(tiny_bert, tmp_path / "g", rank=4)


def test_onnx_export_of_factorised_model(lowrank_bert, tmp_path):
    pytest.importorskip("onnxruntime")
    from surgery.onnx.export import InputSpec, export_onnx

    factorize(lowrank_bert, tmp_path / "f", rank=4, evaluate=False)
    fac = load_factorized(tmp_path / "f")
    vocab = fac.config.vocab_size
    res = export_onnx(None, tmp_path / "onnx", model=fac,
                      inputs=[InputSpec("input_ids", high=vocab), InputSpec("attention_mask", low=1, high=2)],
                      outputs={"last_hidden_state": {0: "batch", 1: "sequence"}})
    assert res.status == "ok", res.validation
    import onnxruntime as ort

    sess = ort.InferenceSession(str(res.model_path), providers=["CPUExecutionProvider"])
    inp = sample_inputs(fac.config, 2, 9, seed=3)
    got = sess.run(None, {k: v.numpy() for k, v in inp.items()})[0]
    ref = last_hidden(_load(lowrank_bert), inp)  # the original (rank-4) model: factorisation is exact here
    assert float((torch.from_numpy(got) - ref).abs().max()) < 1e-4
    # the graph really holds the factors: a MatMul by a (32, 4) / (4, 32) initializer
    import onnx

    m = onnx.load(str(res.model_path), load_external_data=False)
    shapes = {tuple(i.dims) for i in m.graph.initializer}
    assert (4, 32) in shapes or (32, 4) in shapes
