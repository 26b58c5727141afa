"""surgery.ops.init_lora (init-lora): PiSSA / MiLoRA / OLoRA factors and the residual model.

Oracles: PEFT's own init_lora_weights="pissa" / "olora" (same products B·A, same
residual weights), and PeftModel.from_pretrained(residual, adapter) computing the
original model's outputs.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from surgery.cli.main import cli
from surgery.errors import OptionError, OutputError
from surgery.ops.init_lora import init_factors, init_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _load(path, dtype=torch.float32):
    cfg = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, cfg["architectures"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path, dtype=dtype).eval()


def _ids(vocab, seed=0, shape=(2, 8)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return (o.last_hidden_state if hasattr(o, "last_hidden_state") and o.last_hidden_state is not None
            else o.logits).float()


def _peft_on(residual_dir, adapter_dir, dtype=torch.float32):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_load(residual_dir, dtype), adapter_dir).eval()


def _products(adapter_dir):
    """module -> B @ A (out, in) from our adapter file (signs of factors are arbitrary)."""
    sd = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for k, A in sd.items():
        if k.endswith(".lora_A.weight"):
            mod = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[mod] = sd[k.replace("lora_A", "lora_B")].float() @ A.float()
    return out


# ----------------------------------------------------------------------------- the algebra


def _matrix(m, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) / n ** 0.5


@settings(max_examples=15, deadline=None)
@given(m=st.integers(4, 24), n=st.integers(4, 24), seed=st.integers(0, 1000), alpha_mul=st.sampled_from([0.5, 1, 2]))
def test_factors_reconstruct_exactly_and_follow_each_method(m, n, seed, alpha_mul):
    M = _matrix(m, n, seed)
    r = max(1, min(m, n) // 3)
    s = alpha_mul  # scale = alpha / r
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    for method in ("pissa", "milora", "olora"):
        A, B = init_factors(M, r, method, s, svd="exact")
        assert A.shape == (r, n) and B.shape == (m, r)
        P = s * (B @ A).double()  # (m, n)
        # residual + s·B·A == M by construction; check the part each method puts in the adapter
        if method == "pissa":
            want = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        elif method == "milora":
            want = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]
        else:
            Q = torch.linalg.qr(M.double()).Q[:, :r]
            want = s * (Q @ Q.T @ M.double())  # OLoRA: s·Q_r R_r, with R_r = Q_rᵀ M
        torch.testing.assert_close(P, want, atol=1e-5, rtol=1e-4)
    # negative control: the top and bottom components are different matrices
    Ap, Bp = init_factors(M, r, "pissa", s, svd="exact")
    Am, Bm = init_factors(M, r, "milora", s, svd="exact")
    if S[r - 1] - S[-r] > 1e-3:
        assert not torch.allclose(Bp @ Ap, Bm @ Am, atol=1e-4)


def test_pissa_factor_scaling_matches_peft_convention():
    # PEFT divides S by the scale before the square root: A = √(S/s) Vh, so ‖A_i‖ = √(σ_i/s)
    M = _matrix(20, 12, 3)
    A, B = init_factors(M, 4, "pissa", 2.0, svd="exact")
    S = torch.linalg.svdvals(M)[:4]
    torch.testing.assert_close(A.norm(dim=1), (S / 2).sqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(B.norm(dim=0), (S / 2).sqrt(), atol=1e-5, rtol=1e-5)
    # negative control: unscaled factors would carry √σ
    assert not torch.allclose(A.norm(dim=1), S.sqrt(), atol=1e-3)


def test_olora_matches_full_qr_factors():
    M = _matrix(30, 18, 5)
    A, B = init_factors(M, 5, "olora")
    Q, R = torch.linalg.qr(M)
    torch.testing.assert_close(B, Q[:, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A, R[:5], atol=1e-5, rtol=1e-5)


def test_factor_option_errors():
    M = _matrix(8, 6, 0)
    with pytest.raises(OptionError, match="rank 7"):
        init_factors(M, 7, "pissa")
    with pytest.raises(OptionError, match="unknown method"):
        init_factors(M, 2, "lora-ga")


# ----------------------------------------------------------------------------- against PEFT's own init


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_same_products_and_residual_as_peft_init(tiny_bert, tmp_path, method):
    from peft import LoraConfig, get_peft_model

    res = init_lora(tiny_bert, tmp_path / "o", rank=4, method=method, alpha=8, svd="exact")
    ours = _products(tmp_path / "o" / "adapter")
    targets = sorted(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_load(tiny_bert), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         init_lora_weights=method))
    residual = load_file(tmp_path / "o" / "residual" / "model.safetensors")
    for name, mod in pm.base_model.model.named_modules():
        if name in ours:
            theirs = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
            torch.testing.assert_close(ours[name], theirs.detach(), atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(residual[name + ".weight"], mod.base_layer.weight.detach(),
                                       atol=2e-5, rtol=1e-4)
    assert len(res.modules) == len(targets) == 13
    assert res.max_rel_error < 1e-6


def test_pissa_is_not_olora_negative_control(tiny_bert, tmp_path):
    init_lora(tiny_bert, tmp_path / "p", rank=4, method="pissa", svd="exact")
    init_lora(tiny_bert, tmp_path / "q", rank=4, method="olora")
    p, q = _products(tmp_path / "p" / "adapter"), _products(tmp_path / "q" / "adapter")
    assert all(not torch.allclose(p[k], q[k], atol=1e-3) for k in p)


# ----------------------------------------------------------------------------- PEFT reproduces the model


@pytest.mark.parametrize("method", ["pissa", "milora", "olora"])
def test_peft_on_residual_reproduces_bert(tiny_bert, tmp_path, method):
    init_lora(tiny_bert, tmp_path / "o", rank=4, method=method, alpha=16)
    ids = _ids(100)
    ref = _out(_load(tiny_bert), ids)
    got = _out(_peft_on(tmp_path / "o" / "residual", tmp_path / "o" / "adapter"), ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    # negative control: the residual alone is a different model
    alone = _out(_load(tmp_path / "o" / "residual"), ids)
    assert (alone - ref).abs().max() > 1e-3  # MiLoRA takes only the minor components: a small change


def test_peft_on_residual_reproduces_gpt2_conv1d(tiny_gpt2, tmp_path):
    res = init_lora(tiny_gpt2, tmp_path / "o", rank=4, method="olora")
    assert {m.kind for m in res.modules} == {"conv1d"}
    assert json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ids = _ids(100)
    ref = _out(_load(tiny_gpt2), ids)
    got = _out(_peft_on(tmp_path / "o" / "residual", tmp_path / "o" / "adapter"), ids)
    torch.testing.assert_close(got, ref, atol=5e-5, rtol=1e-4)


def test_bf16_llama_within_stated_tolerance(tiny_llama, tmp_path):
    res = init_lora(tiny_llama, tmp_path / "o", rank=4, method="pissa")
    assert res.residual_dtype == "bfloat16" and res.adapter_dtype == "fp32"
    # stated: the bf16 residual is the only rounding, relative error ≲ 2⁻⁸·‖W_res‖/‖W‖
    assert all(m.rel_error <= 2 ** -8 * m.rel_residual + 1e-6 for m in res.modules)
    assert res.max_rel_error < 4e-3
    # sharding is kept (the fixture is sharded at 20KB) and the weight names are unchanged
    idx = json.loads((tmp_path / "o" / "residual" / "model.safetensors.index.json").read_text())
    orig = json.loads((tiny_llama / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(orig["weight_map"])
    ids = _ids(128)
    ref = _out(_load(tiny_llama, torch.bfloat16), ids)
    got = _out(_peft_on(tmp_path / "o" / "residual", tmp_path / "o" / "adapter", torch.bfloat16), ids)
    # logits of a bf16 model: a few bf16 ulps of |logit| ~ 1
    assert (got - ref).abs().max() < 5e-2
    alone = _out(_load(tmp_path / "o" / "residual", torch.bfloat16), ids)
    assert (alone - ref).abs().max() > 0.1  # negative control


def test_minilm_pissa_reproduces_outputs(minilm_dir, tmp_path):
    res = init_lora(minilm_dir, tmp_path / "o", rank=8, method="pissa", include=[r"encoder\.layer\.[01]\."])
    assert len(res.modules) == 12 and res.max_rel_error < 1e-6
    assert (tmp_path / "o" / "residual" / "1_Pooling" / "config.json").is_file()  # sub-folders copied
    ids = _ids(30522, shape=(2, 12))
    ref = _out(_load(minilm_dir), ids)
    got = _out(_peft_on(tmp_path / "o" / "residual", tmp_path / "o" / "adapter"), ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- errors and CLI


def test_rank_too_large_and_existing_output(tiny_bert, tmp_path):
    with pytest.raises(OptionError, match="rank 40 exceeds"):
        init_lora(tiny_bert, tmp_path / "o", rank=40)
    assert not (tmp_path / "o").exists()
    init_lora(tiny_bert, tmp_path / "o", rank=2, include=["pooler"])
    with pytest.raises(OutputError, match="already exists"):
        init_lora(tiny_bert, tmp_path / "o", rank=2, include=["pooler"])
    init_lora(tiny_bert, tmp_path / "o", rank=2, include=["pooler"], overwrite=True)
    with pytest.raises(OptionError, match="matches no"):
        init_lora(tiny_bert, tmp_path / "p", rank=2, include=["nosuchmodule"])


def test_cli_init_lora(tiny_bert, tiny_bert_lora, tmp_path):
    r = CliRunner().invoke(cli, ["init-lora", str(tiny_bert), "-o", str(tmp_path / "o"), "--rank", "3",
                                 "--method", "milora", "--json", "-q"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["method"] == "milora" and rep["rank"] == 3 and len(rep["modules"]) == 13
    assert json.loads((tmp_path / "o" / "init.json").read_text())["method"] == "milora"
    r = CliRunner().invoke(cli, ["init-lora", str(tiny_bert), "-o", str(tmp_path / "o"), "--rank", "3"])
    assert r.exit_code == 1 and "already exists" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["init-lora", str(tiny_bert), "-o", str(tmp_path / "p"), "--rank", "3",
                                 "--method", "loftq"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, ["init-lora", str(tiny_bert_lora), "-o", str(tmp_path / "p"), "--rank", "3"])
    assert r.exit_code == 1 and "adapter directory" in r.stderr
