"""Sanity checks of the committed fixtures and of the helpers in fixtures/make_fixtures.py.

The fixtures are what every other test stands on, so check that transformers / PEFT load
them offline, that their layouts are the ones they claim (sharded bf16, tied GPT-2, .bin),
and that each fine-tuned twin differs from its base by exactly the designed delta.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fixtures.make_fixtures import (
    FT_TWINS,
    dir_size,
    ft_delta,
    make_ft_twin,
    make_peft_adapter,
    make_tiny_bert,
)

ALL_MODELS = [
    "tiny-bert", "tiny-bert-ft", "tiny-bert-bin",
    "tiny-llama", "tiny-llama-ft", "tiny-gpt2", "tiny-gpt2-ft",
]
ALL_DIRS = ALL_MODELS + ["tiny-llama-lora", "tiny-bert-lora"]


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, straight from the files (no transformers)."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    for path in sorted(Path(directory).glob("*.bin")):
        out.update(torch.load(path, map_location="cpu", weights_only=True))
    return out


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*")) if p.is_file()
    }


def load_model(directory: Path):
    import transformers

    arch = json.loads((directory / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, arch).from_pretrained(
        directory, dtype="auto", output_loading_info=True
    )
    return model.eval(), info


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", ALL_DIRS)
def test_fixture_dirs_are_small(fixtures_dir, name):
    assert 0 < dir_size(fixtures_dir / name) < 1_000_000


def test_llama_is_sharded_bf16(tiny_llama):
    shards = sorted(tiny_llama.glob("model-*-of-*.safetensors"))
    index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    tensors = load_tensors(tiny_llama)
    assert set(tensors) == set(index["weight_map"])
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert "lm_head.weight" in tensors  # untied
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)  # GQA: 2 kv heads x 8


def test_gpt2_is_tied_and_conv1d(tiny_gpt2):
    tensors = load_tensors(tiny_gpt2)
    assert "lm_head.weight" not in tensors and "transformer.wte.weight" in tensors
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D: (in, out)


def test_bert_bin_is_zip_and_equals_safetensors(tiny_bert, tiny_bert_bin):
    assert not list(tiny_bert_bin.glob("*.safetensors"))
    assert zipfile.is_zipfile(tiny_bert_bin / "pytorch_model.bin")  # new torch.save format
    a, b = load_tensors(tiny_bert), load_tensors(tiny_bert_bin)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ALL_MODELS)
def test_models_and_tokenizers_load_offline(fixtures_dir, name):
    from transformers import AutoTokenizer

    directory = fixtures_dir / name
    model, info = load_model(directory)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # What transformers loaded is what the files hold (tied lm_head aside).
    state = model.state_dict()
    for key, tensor in load_tensors(directory).items():
        assert torch.equal(state[key], tensor), key

    tok = AutoTokenizer.from_pretrained(directory)
    enc = tok("the model is small .", return_tensors="pt")
    assert tok.unk_token_id not in enc["input_ids"][0].tolist()
    assert int(enc["input_ids"].max()) < model.config.vocab_size
    with torch.no_grad():
        out = model(**enc)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits
    assert torch.isfinite(hidden.float()).all()


@pytest.mark.parametrize(
    "adapter, base, prefix",
    [("tiny-llama-lora", "tiny-llama", "model.layers.0.self_attn.q_proj"),
     ("tiny-bert-lora", "tiny-bert", "encoder.layer.0.attention.self.query")],
)
def test_peft_adapters_load_and_change_weights(fixtures_dir, adapter, base, prefix):
    from peft import PeftModel

    cfg = json.loads((fixtures_dir / adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == f"fixtures/{base}"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == sorted(cfg["target_modules"])

    base_model, _ = load_model(fixtures_dir / base)
    w0 = base_model.get_submodule(prefix).weight.detach().float().clone()  # (out, in)
    merged = PeftModel.from_pretrained(base_model, fixtures_dir / adapter).merge_and_unload()
    w1 = merged.get_submodule(prefix).weight.detach().float()

    lora = load_tensors(fixtures_dir / adapter)
    a = lora[f"base_model.model.{prefix}.lora_A.weight"]  # (r, in)
    b = lora[f"base_model.model.{prefix}.lora_B.weight"]  # (out, r)
    expected = (8 / 4) * (b @ a)  # (out, in)
    # fp32 base: float round-off only; bf16 base: the merged weight is rounded to bf16, one ulp
    # at the largest weight (2**-7 relative) bounds that.
    atol = float(w0.abs().max()) * (2**-7 if "llama" in base else 1e-6)
    assert (w1 - w0).norm() > 0.05 * w0.norm()  # a non-zero adapter
    torch.testing.assert_close(w1 - w0, expected, atol=atol, rtol=0)
    # Negative control: the transposed product (a plausible bug) does not match.
    assert expected.shape[0] == expected.shape[1]
    assert not torch.allclose(w1 - w0, expected.T, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- ft twins


@pytest.mark.parametrize("twin", sorted(FT_TWINS))
def test_ft_twin_is_base_plus_designed_delta(fixtures_dir, twin):
    base_name, seed = FT_TWINS[twin]
    base, ft = load_tensors(fixtures_dir / base_name), load_tensors(fixtures_dir / twin)
    assert base.keys() == ft.keys()
    for name, w in base.items():
        # make_ft_twin computes base + delta in fp32 and casts back: reproducible bit for bit.
        expected = (w.float() + ft_delta(name, w, seed=seed)).to(w.dtype)
        assert torch.equal(ft[name], expected), name
    # Negative control: another seed's delta does not reproduce the twin.
    name = next(iter(base))
    wrong = (base[name].float() + ft_delta(name, base[name], seed=seed + 1)).to(base[name].dtype)
    assert not torch.equal(ft[name], wrong)


@pytest.mark.parametrize("twin", sorted(FT_TWINS))
def test_ft_twin_delta_is_rank4_plus_small_noise(fixtures_dir, twin):
    base_name, _ = FT_TWINS[twin]
    base, ft = load_tensors(fixtures_dir / base_name), load_tensors(fixtures_dir / twin)
    # Relative residual after rank 4 is the noise share (1e-3 / 0.05 = 2 %); bf16 rounding of
    # the stored weights adds about as much again.
    bound4 = 0.05 if base_name == "tiny-llama" else 0.025
    checked = 0
    for name, w in base.items():
        delta = ft[name].float() - w.float()
        if w.ndim == 1:
            assert 0 < float(delta.abs().max()) < 0.05, name  # biases / LayerNorm: small noise
            continue
        if min(w.shape) <= 4:
            continue  # e.g. BERT token_type_embeddings (2, 32): rank-4 delta is full rank
        s2 = torch.linalg.svdvals(delta).pow(2)  # (min(m, n),)
        res4 = float((s2[4:].sum() / s2.sum()).sqrt())
        res3 = float((s2[3:].sum() / s2.sum()).sqrt())
        rel = float(delta.norm() / w.float().norm())
        assert res4 < bound4, (name, res4)
        assert res3 > 0.15, (name, res3)  # negative control: rank 3 is clearly not enough
        assert 0.045 < rel < 0.055, (name, rel)
        checked += 1
    assert checked >= 8


# ----------------------------------------------------------------------------- helpers


def test_builders_are_deterministic_and_match_committed(tmp_path, tiny_bert):
    a = make_tiny_bert(tmp_path / "a", seed=0)
    b = make_tiny_bert(tmp_path / "b", seed=0)
    assert tree_digest(a) == tree_digest(b)
    fa, fb = make_ft_twin(a, tmp_path / "fa", seed=5), make_ft_twin(b, tmp_path / "fb", seed=5)
    assert tree_digest(fa) == tree_digest(fb)
    # The committed fixture is what the script produces now (stale fixtures would fail here).
    committed, fresh = load_tensors(tiny_bert), load_tensors(a)
    assert all(torch.equal(committed[k], fresh[k]) for k in committed)
    # Negative control: another seed gives other weights.
    c = load_tensors(make_tiny_bert(tmp_path / "c", seed=1))
    assert not torch.equal(c["pooler.dense.weight"], fresh["pooler.dense.weight"])


def test_make_ft_twin_keeps_sharding_and_dtype(tmp_path, tiny_llama):
    out = make_ft_twin(tiny_llama, tmp_path / "ft", rank=2, seed=9)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_llama.iterdir())
    assert (out / "model.safetensors.index.json").read_bytes() == (
        tiny_llama / "model.safetensors.index.json"
    ).read_bytes()
    base, ft = load_tensors(tiny_llama), load_tensors(out)
    assert all(ft[k].dtype == torch.bfloat16 for k in ft)
    delta = ft["model.layers.1.mlp.up_proj.weight"].float() - base["model.layers.1.mlp.up_proj.weight"].float()
    s = torch.linalg.svdvals(delta)  # rank 2 designed: third singular value at the noise floor
    assert s[2] < 0.1 * s[1]
    # A second run into the same directory replaces it with identical bytes.
    before = tree_digest(out)
    make_ft_twin(tiny_llama, out, rank=2, seed=9)
    assert tree_digest(out) == before


def test_make_ft_twin_on_minilm(minilm_dir, minilm_ft):
    from transformers import AutoModel, AutoTokenizer

    # Every non-weight file (tokenizer, sentence-transformers 1_Pooling/...) is copied as is.
    base_files, ft_files = tree_digest(minilm_dir), tree_digest(minilm_ft)
    assert base_files.keys() == ft_files.keys()
    assert [k for k in base_files if base_files[k] != ft_files[k]] == ["model.safetensors"]

    name = "encoder.layer.3.attention.self.query.weight"
    with safe_open(minilm_dir / "model.safetensors", "pt") as fb, safe_open(
        minilm_ft / "model.safetensors", "pt"
    ) as ff:
        assert fb.metadata() == ff.metadata()
        assert list(fb.keys()) == list(ff.keys())
        w, w_ft = fb.get_tensor(name), ff.get_tensor(name)
    torch.testing.assert_close(w_ft - w, ft_delta(name, w, seed=100), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(w_ft - w, ft_delta(name, w, seed=101), atol=1e-3)  # negative control

    model = AutoModel.from_pretrained(minilm_ft).eval()
    tok = AutoTokenizer.from_pretrained(minilm_ft)
    with torch.no_grad():
        h = model(**tok(["a fine-tuned twin"], return_tensors="pt")).last_hidden_state
    assert torch.isfinite(h).all()


def test_make_peft_adapter_variants(tmp_path, tiny_bert):
    from peft import PeftModel

    out = make_peft_adapter(
        tiny_bert, tmp_path / "adapter", ["query", "value"], r=4, alpha=16, seed=3,
        use_rslora=True, use_dora=True,
        rank_pattern={"encoder.layer.1.attention.self.query": 2},
        alpha_pattern={"encoder.layer.1.attention.self.query": 4},
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["use_dora"]
    assert cfg["rank_pattern"] == {"encoder.layer.1.attention.self.query": 2}
    assert cfg["alpha_pattern"] == {"encoder.layer.1.attention.self.query": 4}
    assert cfg["base_model_name_or_path"] == str(tiny_bert)
    tensors = load_tensors(out)
    assert tensors["base_model.model.encoder.layer.1.attention.self.query.lora_A.weight"].shape == (2, 32)
    assert tensors["base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (4, 32)
    assert any("lora_magnitude_vector" in k for k in tensors)  # DoRA
    b = tensors["base_model.model.encoder.layer.0.attention.self.value.lora_B.weight"]
    assert b.abs().max() > 0  # init_nonzero

    base, _ = load_model(tiny_bert)
    assert isinstance(PeftModel.from_pretrained(base, out), PeftModel)

    # Negative control: PEFT's own init leaves lora_B at zero.
    zero = load_tensors(make_peft_adapter(tiny_bert, tmp_path / "z", ["query"], init_nonzero=False))
    assert all(v.abs().max() == 0 for k, v in zero.items() if "lora_B" in k)
