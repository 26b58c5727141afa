"""Layer kinds: the fast source-text reading must agree with the architecture built on the meta device."""

from __future__ import annotations

import json
import shutil

import pytest

from surgery.core.layers import _from_source, tensor_kinds
from surgery.io import open_checkpoint


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_llama", "tiny_gpt2", "minilm_dir"])
def test_fast_path_equals_meta_model(name, request):
    idx = open_checkpoint(request.getfixturevalue(name))
    assert _from_source(idx) is not None  # the fast path really ran
    assert tensor_kinds(idx, fast=True) == tensor_kinds(idx, fast=False)


def test_gpt2_kinds(tiny_gpt2):
    kinds = tensor_kinds(open_checkpoint(tiny_gpt2))
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "conv1d"
    assert kinds["transformer.h.0.attn.c_attn.bias"] == "bias"
    assert kinds["transformer.wte.weight"] == "embedding"
    assert kinds["transformer.h.0.ln_1.weight"] == "norm"


def test_unknown_attribute_falls_back_to_the_model(tiny_llama, tmp_path):
    """A 2-D weight whose attribute the source does not assign -> no fast answer (negative control)."""
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    idx = open_checkpoint(d)
    renamed = {("model.layers.0.self_attn.mystery.weight" if k == "model.layers.0.self_attn.q_proj.weight" else k): v
               for k, v in idx.tensors.items()}
    idx.tensors = renamed
    assert _from_source(idx) is None
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no_such_model"
    (d / "config.json").write_text(json.dumps(cfg))
    assert _from_source(open_checkpoint(d)) is None


def test_mamba_like_one_d_params_match_the_meta_model(tmp_path):
    """Mamba's mixer.D (1-D, beside 2-D A_log) and conv1d.bias are not norms: the fast path must
    agree with the model built on the meta device (a wrong 'norm' made extract-lora put the whole
    mixer in modules_to_save, clashing with its LoRA modules)."""
    from safetensors.torch import save_file
    from transformers import MambaConfig, MambaModel

    cfg = MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=2)
    model = MambaModel(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    cfg.save_pretrained(tmp_path)
    idx = open_checkpoint(tmp_path)
    fast, meta = tensor_kinds(idx, fast=True), tensor_kinds(idx, fast=False)
    assert fast == meta
    assert fast["layers.0.mixer.D"] != "norm" and fast["layers.0.norm.weight"] == "norm"


def test_float8_non_finite_is_found():
    import torch

    from surgery.core.tensors import all_finite, count_non_finite

    x = torch.zeros(10, dtype=torch.float8_e4m3fn)
    assert all_finite(x)
    x[3] = float("nan")
    assert not all_finite(x) and count_non_finite(x) == 1
