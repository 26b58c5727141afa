"""surgery.core.names: checkpoint names <-> the model's own names, by transformers' conversion mapping.

Oracle: transformers itself — the model built from the same config and loaded with
from_pretrained has exactly the parameter names (and fused values) the map predicts.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from fixtures.zoo import build_model, make_model
from surgery.core.names import name_map
from surgery.io import LazyReader, open_checkpoint


def _map(path: Path):
    idx = open_checkpoint(path)
    return idx, name_map(idx.config, idx.tensors)


@pytest.mark.parametrize("arch", ["gpt-neox", "vit", "mixtral", "llama", "bert-cls"])
def test_module_names_are_the_loaded_models(arch, tmp_path):
    path = build_model(arch, tmp_path / arch)
    idx, nm = _map(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_model(arch)
    own = set(model.state_dict())
    mapped = {nm.module_name(k) for k in idx.tensors}
    assert mapped <= own, sorted(mapped - own)[:3]
    # Negative control: the checkpoint's own names are not the model's where transformers renames.
    if arch in ("gpt-neox", "vit", "mixtral"):
        assert not nm.identity and not set(idx.tensors) <= own
    else:
        assert nm.identity and set(idx.tensors) <= own


def test_gpt_neox_head_both_ways(tmp_path):
    _, nm = _map(build_model("gpt-neox", tmp_path / "m"))
    assert nm.module_name("embed_out.weight") == "lm_head.weight"
    assert nm.checkpoint_name("lm_head.weight") == "embed_out.weight"
    assert nm.checkpoint_name("lm_head") == "embed_out"  # a module name maps too
    assert nm.checkpoint_name("gpt_neox.embed_in.weight") == "gpt_neox.embed_in.weight"
    assert nm.split({"lm_head.weight": torch.zeros(1)}).keys() == {"embed_out.weight"}


def test_vit_legacy_names(tmp_path):
    _, nm = _map(build_model("vit", tmp_path / "m"))
    ck = "vit.encoder.layer.1.attention.attention.query.weight"
    assert nm.module_name(ck) == "vit.layers.1.attention.q_proj.weight"
    assert nm.checkpoint_name("vit.layers.1.attention.q_proj.weight") == ck
    assert nm.checkpoint_name("vit.layers.1.attention.q_proj") == "vit.encoder.layer.1.attention.attention.query"


def test_mixtral_experts_fuse_and_split_back(tmp_path):
    """Fusion.combine gives what from_pretrained puts in the model; split() inverts it exactly."""
    path = build_model("mixtral", tmp_path / "m")
    idx, nm = _map(path)
    target = "model.layers.1.mlp.experts.gate_up_proj"
    fusion = nm.fusions[target]
    assert fusion.targets == (target,)
    assert fusion.sources[:2] == ("model.layers.1.block_sparse_moe.experts.0.w1.weight",
                                  "model.layers.1.block_sparse_moe.experts.0.w3.weight")
    assert nm.module_name(fusion.sources[0]) == target and nm.checkpoint_name(target) is None
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32)
    with LazyReader(idx) as r:
        fused = fusion.combine(r.get)
        assert torch.equal(fused[target], loaded.state_dict()[target])  # (E, 2I, H), as transformers loads it
        back = nm.split(fused)
        assert set(back) == set(fusion.sources)
        assert all(torch.equal(back[k], r.get(k)) for k in back)
        # Negative control: another layer's experts are other values.
        other = nm.fusions["model.layers.0.mlp.experts.gate_up_proj"].combine(r.get)
        assert not torch.equal(other["model.layers.0.mlp.experts.gate_up_proj"], fused[target])


def test_no_config_or_custom_code_keeps_names(tmp_path):
    assert name_map(None, ["a.weight"]).identity
    cfg = json.loads((build_model("gpt-neox", tmp_path / "m") / "config.json").read_text())
    assert name_map({**cfg, "auto_map": {"AutoModel": "x.Y"}}, ["embed_out.weight"]).identity
