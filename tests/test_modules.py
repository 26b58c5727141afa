"""Layer kinds: the fast source-text reading must agree with the architecture built on the meta device."""

from __future__ import annotations

import json
import shutil

import pytest

from surgery.io import open_checkpoint
from surgery.modules import _from_source, tensor_kinds


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
