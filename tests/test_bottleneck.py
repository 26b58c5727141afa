"""surgery.ops.bottleneck (init-adapter): Houlsby bottleneck adapters, SVD-initialised."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery.cli.main import cli
from surgery.errors import AdapterError, CheckpointError, OptionError, OutputError
from surgery.ops.bottleneck import (
    BottleneckAdapter,
    attach_bottleneck,
    init_adapter,
    load_bottleneck,
    save_bottleneck,
    sites,
)

transformers = pytest.importorskip("transformers")
from helpers import load_fp32_model  # noqa: E402

_load = load_fp32_model


def _ids(vocab, shape=(2, 8)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def _out(model, ids):
    o = model(input_ids=ids)
    return o.last_hidden_state if getattr(o, "last_hidden_state", None) is not None else o.logits


def test_sites_by_architecture():
    bert = ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense",
            "encoder.layer.0.intermediate.dense", "pooler.dense"]
    assert sites(bert, "ffn") == {"encoder.layer.0.output.dense": "ffn"}
    assert sites(bert, "attn") == {"encoder.layer.0.attention.output.dense": "attn"}
    assert len(sites(bert, "both")) == 2
    llama = ["model.layers.3.self_attn.o_proj", "model.layers.3.mlp.down_proj", "model.layers.3.mlp.up_proj"]
    assert sites(llama, "both") == {"model.layers.3.self_attn.o_proj": "attn", "model.layers.3.mlp.down_proj": "ffn"}
    gpt2 = ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj", "transformer.h.0.attn.c_attn"]
    assert sites(gpt2, "both") == {"transformer.h.0.attn.c_proj": "attn", "transformer.h.0.mlp.c_proj": "ffn"}
    assert sites(bert, "ffn", pattern="pooler") == {"pooler.dense": "custom"}
    with pytest.raises(OptionError):
        sites(bert, "middle")


def test_identity_at_init_param_count_and_down_init(tiny_bert, tmp_path):
    R = 4
    res = init_adapter(tiny_bert, tmp_path / "ad", bottleneck=R, placement="both")
    assert len(res.modules) == 4 and res.trainable_params == sum(2 * 32 * R + R + 32 for _ in range(4))
    model = _load(tiny_bert)
    ids = _ids(100)
    with torch.no_grad():
        ref = _out(model, ids)
    before = set(model.state_dict())
    h = attach_bottleneck(model, tmp_path / "ad")
    assert h.num_trainable() == res.trainable_params == 4 * (2 * 32 * R + R + 32)
    with torch.no_grad():
        assert torch.equal(_out(model, ids), ref)  # up = 0: exactly the same outputs
    # down = top-R left singular vectors of the projection's weight (orthonormal rows spanning U_R)
    W = model.get_submodule("encoder.layer.0.output.dense").weight.detach()
    D = h.adapters["encoder.layer.0.output.dense"].down.weight.detach()  # (R, d)
    torch.testing.assert_close(D @ D.T, torch.eye(R), atol=1e-5, rtol=0)
    U = torch.linalg.svd(W).U[:, :R]
    torch.testing.assert_close(D.T @ D, U @ U.T, atol=1e-5, rtol=0)  # same subspace (signs free)
    # negative control: a non-zero up-projection changes the outputs
    with torch.no_grad():
        for a in h.adapters.values():
            a.up.weight.normal_(0, 0.5)
        assert not torch.allclose(_out(model, ids), ref, atol=1e-3)
    h.remove()
    with torch.no_grad():
        assert torch.equal(_out(model, ids), ref)  # removed: back to the original
    assert set(model.state_dict()) == before


def test_gradients_flow(tiny_bert, tmp_path):
    init_adapter(tiny_bert, tmp_path / "ad", bottleneck=3, placement="ffn")
    model = _load(tiny_bert)
    h = attach_bottleneck(model, tmp_path / "ad", freeze_base=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == h.num_trainable() == 2 * (2 * 32 * 3 + 3 + 32)
    opt = torch.optim.SGD(h.parameters(), lr=0.5)
    ids = _ids(100)
    for step in range(2):
        opt.zero_grad()
        _out(model, ids).pow(2).mean().backward()
        ad = h.adapters["encoder.layer.0.output.dense"]
        assert ad.up.weight.grad.abs().sum() > 0  # the zero-initialised side learns first
        if step == 0:
            assert ad.down.weight.grad.abs().sum() == 0  # up = 0 blocks it at step 0...
        else:
            assert ad.down.weight.grad.abs().sum() > 0  # ...and not after one update
        opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if "bottleneck" not in n)
    h.remove()
    assert all(p.requires_grad for p in model.parameters())


def test_from_delta_identity_full_rank_reproduces_ft_projection(tiny_bert, tiny_bert_ft, tmp_path):
    mod = "encoder.layer.0.attention.output.dense"  # square 32x32, invertible
    res = init_adapter(tiny_bert, tmp_path / "ad", bottleneck=32, modules=mod.replace(".", r"\."),
                       from_delta=(tiny_bert, tiny_bert_ft), activation="identity")
    assert res.captured == pytest.approx(1.0, abs=1e-5)
    base, ft = _load(tiny_bert), _load(tiny_bert_ft)
    attach_bottleneck(base, tmp_path / "ad")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(base.get_submodule(mod)(x), ft.get_submodule(mod)(x), atol=1e-4, rtol=1e-4)
    # negative control: a rank-2 bottleneck captures only part of the (rank-4) delta
    res2 = init_adapter(tiny_bert, tmp_path / "ad2", bottleneck=2, modules=mod.replace(".", r"\."),
                        from_delta=(tiny_bert, tiny_bert_ft), activation="identity")
    assert res2.captured < 0.9
    base2 = _load(tiny_bert)
    attach_bottleneck(base2, tmp_path / "ad2")
    with torch.no_grad():
        assert not torch.allclose(base2.get_submodule(mod)(x), ft.get_submodule(mod)(x), atol=1e-3)


def test_from_delta_reports_capture_with_nonlinearity(tiny_bert, tiny_bert_ft, tmp_path):
    res = init_adapter(tiny_bert, tmp_path / "ad", bottleneck=8, from_delta=(tiny_bert, tiny_bert_ft))
    assert res.init == "delta" and 0 < res.captured < 1 and res.notes
    # FFN output projections are 32x64: only the part of Δ in W's row space is a function of h
    for m in res.modules:
        assert 0.3 < m.captured < 0.8


def test_conv1d_and_llama(tiny_gpt2, tiny_llama, tmp_path):
    init_adapter(tiny_gpt2, tmp_path / "g", bottleneck=4, placement="both")
    model = _load(tiny_gpt2)
    ids = _ids(100)
    with torch.no_grad():
        ref = _out(model, ids)
        h = attach_bottleneck(model, tmp_path / "g")
        assert len(h.adapters) == 4 and torch.equal(_out(model, ids), ref)
    res = init_adapter(tiny_llama, tmp_path / "l", bottleneck=4, placement="attn")
    assert [m.module for m in res.modules] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


def test_save_load_round_trip_and_format(tiny_bert, tmp_path):
    init_adapter(tiny_bert, tmp_path / "ad", bottleneck=2)
    cfg = json.loads((tmp_path / "ad" / "bottleneck_config.json").read_text())
    assert cfg["format"] == "surgery-bottleneck" and cfg["format_version"] == 1 and cfg["bottleneck"] == 2
    keys = set(load_file(tmp_path / "ad" / "bottleneck_model.safetensors"))
    assert "encoder.layer.0.output.dense.down.weight" in keys and len(keys) == 8
    s = load_bottleneck(tmp_path / "ad")
    for a in s.adapters.values():
        torch.nn.init.normal_(a.up.weight)
    save_bottleneck(s, tmp_path / "ad2")
    s2 = load_bottleneck(tmp_path / "ad2")
    for m in s.adapters:
        for (k, t), (_, t2) in zip(s.adapters[m].state_dict().items(), s2.adapters[m].state_dict().items()):
            assert torch.equal(t, t2), k
    with pytest.raises(OutputError):
        save_bottleneck(s, tmp_path / "ad2")


def test_load_and_attach_errors(tiny_bert, tiny_gpt2, tmp_path):
    init_adapter(tiny_bert, tmp_path / "ad", bottleneck=2)
    with pytest.raises(AdapterError, match="not in the model"):
        attach_bottleneck(_load(tiny_gpt2), tmp_path / "ad")
    model = _load(tiny_bert)
    attach_bottleneck(model, tmp_path / "ad")
    with pytest.raises(AdapterError, match="already has"):
        attach_bottleneck(model, tmp_path / "ad")
    with pytest.raises(AdapterError, match="not a bottleneck adapter directory"):
        load_bottleneck(tmp_path)
    sd = load_file(tmp_path / "ad" / "bottleneck_model.safetensors")
    sd["encoder.layer.0.output.dense.up.weight"] = torch.zeros(32, 3)
    save_file(sd, tmp_path / "ad" / "bottleneck_model.safetensors")
    with pytest.raises(AdapterError, match="expected"):
        load_bottleneck(tmp_path / "ad")
    with pytest.raises(OptionError, match="exceeds"):
        init_adapter(tiny_bert, tmp_path / "x", bottleneck=40)
    with pytest.raises(OptionError, match="selects no"):
        init_adapter(tiny_bert, tmp_path / "x", bottleneck=2, modules="nosuch")
    with pytest.raises(CheckpointError, match="same architecture"):
        init_adapter(tiny_bert, tmp_path / "x", bottleneck=2, from_delta=(tiny_bert, tiny_gpt2))
    assert not (tmp_path / "x").exists()


def test_minilm_identity_at_init(minilm_dir, tmp_path):
    res = init_adapter(minilm_dir, tmp_path / "ad", bottleneck=16, placement="both")
    assert len(res.modules) == 12 and res.trainable_params == 12 * (2 * 384 * 16 + 16 + 384)
    model = _load(minilm_dir)
    ids = _ids(30522, (2, 10))
    with torch.no_grad():
        ref = _out(model, ids)
        attach_bottleneck(model, tmp_path / "ad")
        assert torch.equal(_out(model, ids), ref)


def test_cli_init_adapter(tiny_bert, tiny_bert_ft, tmp_path):
    r = CliRunner().invoke(cli, ["init-adapter", str(tiny_bert), "-o", str(tmp_path / "a"), "--bottleneck", "4",
                                 "--placement", "both", "-q"])
    assert r.exit_code == 0, r.output
    assert "4 bottleneck adapters" in r.stdout
    r = CliRunner().invoke(cli, ["init-adapter", str(tiny_bert), "-o", str(tmp_path / "a"), "--bottleneck", "4"])
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = CliRunner().invoke(cli, ["init-adapter", str(tiny_bert), "-o", str(tmp_path / "b"), "--bottleneck", "4",
                                 "--from-delta", str(tiny_bert), str(tiny_bert_ft), "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert 0 < json.loads(r.stdout)["captured"] < 1
    r = CliRunner().invoke(cli, ["init-adapter", str(tiny_bert), "-o", str(tmp_path / "c"), "--bottleneck", "0"])
    assert r.exit_code == 2


def test_adapter_module_shape():
    a = BottleneckAdapter(8, 2, "relu")
    assert sum(p.numel() for p in a.parameters()) == 2 * 8 * 2 + 2 + 8
    with pytest.raises(OptionError):
        BottleneckAdapter(8, 2, "swish2")
