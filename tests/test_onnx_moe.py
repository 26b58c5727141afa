"""Mixture-of-experts causal LMs (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) exported to ONNX.

transformers 5 runs their experts through grouped_mm (no ONNX lowering in the dynamo exporter;
histc stops the legacy one); surgery.onnx.moe.dense_experts swaps in a dense, traceable form while
tracing only. The oracle is the untouched sparse PyTorch model: greedy generation with the cache
(validate_generation) and logits without it (validate_onnx). Negative controls: one expert's
weights scaled in the saved graph, and a dense form that drops the routing weights, must fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import onnx
import pytest
import torch

from fixtures.zoo import build_model, make_model
from helpers import copy_export_editing
from surgery.errors import ValidationError
from surgery.onnx import moe
from surgery.onnx.decoder import export_decoder_with_past
from surgery.onnx.decoder_check import validate_generation

ROOT = Path(__file__).resolve().parents[1]
MOE = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]


def _experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if moe.is_fused_experts(m)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One with-past export per architecture per module: {arch: (model, result)}."""
    cache: dict[str, tuple[torch.nn.Module, object]] = {}

    def get(arch: str):
        if arch not in cache:
            model = make_model(arch.removesuffix("_mha"))
            if arch.endswith("_mha"):  # kv heads = heads (what ORTModelForCausalLM 0.1.0 assumes for Mixtral)
                model.config.num_key_value_heads = model.config.num_attention_heads
                torch.manual_seed(0)
                model = type(model)(model.config).eval()
            cache[arch] = (model, export_decoder_with_past(model, tmp_path_factory.mktemp(arch) / "onnx"))
        return cache[arch]

    return get


def test_dense_form_equals_sparse_and_is_undone():
    """In PyTorch: the dense experts give the sparse model's logits; on exit the model is its own again."""
    model = make_model("mixtral")
    impl = model.config._experts_implementation
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        with moe.dense_experts(model) as note:
            assert all("forward" in m.__dict__ for m in _experts(model))
            dense = model(ids).logits
        after = model(ids).logits
    torch.testing.assert_close(dense, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, ref) and model.config._experts_implementation == impl
    assert not any("forward" in m.__dict__ for m in _experts(model))
    assert note is not None and "2 experts blocks" in note and "4/2 = 2x" in note
    # a model without experts passes through
    with moe.dense_experts(torch.nn.Linear(2, 2)) as none:
        assert none is None


@pytest.mark.parametrize("arch", MOE)
def test_moe_exports_with_past_and_generates_like_sparse_pytorch(arch, exports):
    model, r = exports(arch)
    assert len(_experts(model)) == 2
    assert r.status == "ok" and r.exporter == "legacy", r.exporter_note  # auto: legacy first
    assert "experts blocks exported densely" in r.exporter_note
    v = r.validation
    assert v.passed and not v.mismatches and v.worst.tol_ratio <= 1.0, v.failure_message()
    for name in v.prompt_lengths:
        assert v.onnx_tokens[name] == v.torch_tokens[name] and all(len(t) == 16 for t in v.onnx_tokens[name])
    m = json.loads((r.out_dir / "manifest.json").read_text())
    assert m["status"] == "ok" and "densely" in m["exporter_note"]
    # the caller's model is untouched: its experts run their own (sparse) forward again
    assert not any("forward" in e.__dict__ for e in _experts(model))
    assert model.config._experts_implementation == "grouped_mm"


@pytest.mark.parametrize("arch", MOE)
def test_moe_no_cache_export_validates(arch, tmp_path):
    from surgery.onnx.export import export_onnx
    from surgery.options.export import ExportOptions

    src = build_model(arch, tmp_path / "hf")
    export_onnx(src, tmp_path / "onnx", ExportOptions(cache=False, device="cpu"))
    m = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert m["task"] == "causal-lm" and m["status"] == "ok", m
    assert m["exporter"] == "legacy", m["exporter_note"]  # auto: legacy first, gated (the dense form traces)
    assert "densely" in m["exporter_note"] and "4/2 = 2x" in m["exporter_note"]
    names = {i.name for i in onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph.input}
    assert not any(n.startswith("past_") for n in names)


# ----------------------------------------------------------------------------- negative controls


def _copy_with_expert_scaled(src: Path, dst: Path, scale: float) -> str:
    """Copy an export with expert 0 of its first 3-D initializer scaled (the only 3-D weights are the
    experts' stacked (experts, in, out) projections, constant-folded transposes); its name."""
    def scaled(arr):
        arr[0] *= scale
        return arr

    return copy_export_editing(src, dst, lambda inits: next(t for t in inits if len(t.dims) == 3 and t.dims[0] == 4),
                               scaled)


def test_corrupted_expert_fails_validation(exports, tmp_path):
    model, r = exports("mixtral")
    _copy_with_expert_scaled(r.out_dir, tmp_path / "bad", 1.5)
    with pytest.raises(ValidationError) as ei:
        validate_generation(model, tmp_path / "bad")
    assert ei.value.report.worst.tol_ratio > 1.0
    _copy_with_expert_scaled(r.out_dir, tmp_path / "same", 1.0)  # the copy itself is faithful
    assert validate_generation(model, tmp_path / "same").passed


def test_dense_form_without_routing_weights_fails_validation(monkeypatch, tmp_path):
    """Same experts selected, but each weighted 1/k instead of the router's weights: must fail."""
    real = moe.dense_experts_forward

    def unweighted(self, hidden_states, top_k_index, top_k_weights):
        return real(self, hidden_states, top_k_index, torch.full_like(top_k_weights, 1.0 / top_k_weights.shape[-1]))

    monkeypatch.setattr(moe, "dense_experts_forward", unweighted)
    model = make_model("mixtral")
    with pytest.raises(ValidationError) as ei:
        export_decoder_with_past(model, tmp_path / "o", new_tokens=4)
    assert ei.value.report.worst.tol_ratio > 1.0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["status"] == "failed"


# ----------------------------------------------------------------------------- real clients (peer venvs)


PEERS = {"optimum": ("OPTIMUM_PYTHON", "/tmp/venv-optimum/bin/python", "peer-optimum"),
         "genai": ("GENAI_PYTHON", "/tmp/venv-genai/bin/python", "peer-genai")}


# optimum-onnx 0.1.0 sizes the empty cache with num_key_value_heads only for a fixed list of model
# types (qwen3_moe is in it, mixtral is not: it uses num_attention_heads, so it runs a Mixtral whose
# kv heads = heads, as bench/bench_decoder.py does for phi3/gemma2). genai reads the graph's shapes.
CLIENT_CASES = [("optimum", "mixtral_mha"), ("optimum", "qwen3_moe"), ("genai", "mixtral"), ("genai", "qwen3_moe")]


@pytest.mark.parametrize("peer, arch", CLIENT_CASES)
def test_moe_export_runs_in_real_clients(peer, arch, exports, tmp_path):
    """ORTModelForCausalLM / onnxruntime-genai decode our MoE exports to PyTorch's tokens."""
    env_var, default, cmd = PEERS[peer]
    python = os.environ.get(env_var, default)
    if not Path(python).exists():
        pytest.skip(f"{python} not found (bench/bench_decoder.py says how to make it)")
    from surgery.onnx.decoder_check import _left_pad

    model, r = exports(arch)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16], list(range(20, 41))]  # left-padded, none special
    ids, mask = _left_pad(prompts, 0)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "new_tokens": 16,
                                "pad": 0}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([python, str(ROOT / "bench" / "bench_decoder.py"), cmd, "--dir", str(r.out_dir), "--spec",
                        str(spec)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert p.returncode == 0 and lines, (p.stderr or p.stdout)[-2000:]
    got = json.loads(lines[-1])
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, ids.shape[1]:].tolist()
    assert got["tokens"] == ref
    if "single_tokens" in got:
        assert got["single_tokens"] == ref


def test_legacy_exporter_traces_the_dense_form(monkeypatch, tmp_path):
    """Without dynamo the TorchScript exporter runs (it stops on grouped_mm's histc without the swap)."""
    import surgery.onnx.decoder as dec

    def refuse(*args, **kwargs):
        raise RuntimeError("dynamo refused this model")

    monkeypatch.setattr(dec, "_export_dynamo", refuse)
    r = export_decoder_with_past(make_model("olmoe"), tmp_path / "legacy", new_tokens=4)
    assert r.exporter == "legacy" and "densely" in r.exporter_note
    assert r.status == "ok" and r.validation.passed


def test_fp16_moe_export_matches(tmp_path):
    """fp16 (a cast copy is traced): the routing weights stay fp32 in the dense sum, as in transformers."""
    model = make_model("mixtral")
    r = export_decoder_with_past(model, tmp_path / "fp16", dtype="fp16", new_tokens=8)
    assert r.status == "ok" and r.validation.dtype == "fp16" and r.validation.onnx_tokens == r.validation.torch_tokens
    assert next(model.parameters()).dtype == torch.float32 and not any("forward" in e.__dict__ for e in _experts(model))
