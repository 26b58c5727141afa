"""surgery.core.peft_format: PEFT LoRA adapters read/write, with PEFT itself as the oracle.

PEFT loads what we write (PeftModel.from_pretrained) and must end up holding
exactly our tensors at exactly our scales; we read what PEFT writes
(get_peft_model + save_pretrained) and must agree with its layers' r / scaling.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from surgery.core.peft_format import (
    LoraModule,
    adapter_state_dict,
    config_for_ranks,
    module_key_prefix,
    parse_adapter_config,
    pattern_value,
    read_adapter,
    read_adapter_config,
    write_adapter,
)
from surgery.errors import AdapterError, CheckpointError, OutputError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

HIDDEN, INTER, VOCAB = 16, 32, 64


# ----------------------------------------------------------------------------- helpers


def tiny_llama(seed: int = 0, attention_bias: bool = False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        attention_bias=attention_bias, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def lin(name: str, out: int, inp: int, r: int, *, bias=False, scaling=1.0, seed=0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(
        name, "linear",
        torch.randn(r, inp, generator=g),  # (r, in)
        torch.randn(out, r, generator=g),  # (out, r)
        torch.randn(out, generator=g) if bias else None,  # (out,)
        None, scaling,
    )


def emb(name: str, vocab: int, dim: int, r: int, seed=0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(name, "embedding", torch.randn(r, vocab, generator=g), torch.randn(dim, r, generator=g),
                      None, None, 1.0)


def llama_modules(bias: bool) -> dict[str, LoraModule]:
    """q_proj at rank 4 in both layers, v_proj (out = 8, one kv head) at rank 2 / 3."""
    mods = {}
    for i in range(2):
        q = f"model.layers.{i}.self_attn.q_proj"
        v = f"model.layers.{i}.self_attn.v_proj"
        mods[q] = lin(q, HIDDEN, HIDDEN, 4, bias=bias, seed=10 + i)
        mods[v] = lin(v, 8, HIDDEN, 2 + i, bias=bias, seed=20 + i)
    return mods


def peft_lora_layers(model) -> dict[str, LoraLayer]:
    """{module name in the base model: LoRA layer} of a PeftModel."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            out[name.removeprefix("base_model.model.")] = mod
    return out


def peft_tensors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if "default" in layer.lora_embedding_A:
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"], None
    b = layer.lora_B["default"]
    return layer.lora_A["default"].weight, b.weight, b.bias


def load_peft(model, adapter_dir: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, str(adapter_dir))


def save_peft(model, config: LoraConfig, out: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, config)
        pm.save_pretrained(str(out))
    return out


def edit_config(adapter_dir: Path, **changes) -> None:
    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def edit_weights(adapter_dir: Path, fn) -> None:
    p = adapter_dir / "adapter_model.safetensors"
    sd = fn(load_file(p))
    save_file(sd, p, metadata={"format": "pt"})


# ----------------------------------------------------------------------------- write -> read


def test_round_trip_is_exact(tmp_path):
    mods = llama_modules(bias=False)
    mods["model.embed_tokens"] = emb("model.embed_tokens", VOCAB, HIDDEN, 3)
    mods["model.layers.0.mlp.down_proj"] = lin("model.layers.0.mlp.down_proj", HIDDEN, INTER, 4, scaling=0.5)
    full = {"lm_head.weight": torch.randn(VOCAB, HIDDEN)}
    write_adapter(tmp_path / "a", mods, full_tensors=full, base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    cfg, got, got_full = read_adapter(tmp_path / "a")

    assert list(got) == sorted(mods) and set(got_full) == {"lm_head.weight"}
    for name, m in mods.items():
        g = got[name]
        assert (g.kind, g.bias, g.magnitude) == (m.kind, None, None)
        assert torch.equal(g.A, m.A) and torch.equal(g.B, m.B)
        assert g.scaling == m.scaling == cfg.scaling_for(name)
        assert cfg.rank_for(name) == m.rank
    assert torch.equal(got_full["lm_head.weight"], full["lm_head.weight"])
    assert (cfg.task_type, cfg.base_model_name_or_path, cfg.modules_to_save) == ("CAUSAL_LM", "tiny", ["lm_head"])
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["target_modules"] == sorted(mods) and raw["peft_type"] == "LORA" and raw["use_rslora"] is False
    assert not list(tmp_path.glob(".*surgery-tmp*"))  # temp sibling renamed away

    # negative control: a different adapter does not compare equal
    write_adapter(tmp_path / "b", {k: lin(k, 16, 16, 4, seed=99) for k in ["model.layers.0.self_attn.q_proj"]})
    other = read_adapter(tmp_path / "b")[1]["model.layers.0.self_attn.q_proj"]
    assert not torch.equal(other.A, mods["model.layers.0.self_attn.q_proj"].A)


def test_written_config_gives_scale_one_per_rank(tmp_path):
    mods = llama_modules(bias=False)
    cfg = write_adapter(tmp_path / "a", mods)
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # q_proj x2 at rank 4 is the most common rank; the v_proj ranks go to the patterns, alpha = rank
    assert (raw["r"], raw["lora_alpha"]) == (4, 4)
    assert raw["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 2, "model.layers.1.self_attn.v_proj": 3}
    assert raw["alpha_pattern"] == raw["rank_pattern"]
    assert all(cfg.scaling_for(m) == 1.0 for m in mods)
    # negative control: without the alpha pattern the v_proj scales would be 4/2 and 4/3
    naive = parse_adapter_config({**raw, "alpha_pattern": {}})
    assert naive.scaling_for("model.layers.0.self_attn.v_proj") == 2.0


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from([f"m.{i}.q" for i in range(8)]), st.integers(1, 64), min_size=1),
       st.floats(1e-3, 1e3))
def test_config_for_ranks_property(ranks, scale):
    cfg = parse_adapter_config({"peft_type": "LORA", "target_modules": sorted(ranks),
                                **config_for_ranks(ranks, {m: scale for m in ranks})})
    for m, r in ranks.items():
        assert cfg.rank_for(m) == r
        assert math.isclose(cfg.scaling_for(m), scale, rel_tol=4e-16)  # exact or 1 ulp


# ----------------------------------------------------------------------------- PEFT loads what we write


@pytest.mark.parametrize("bias", [False, True])
def test_peft_loads_exactly_our_tensors(tmp_path, bias):
    mods = llama_modules(bias=bias)
    # rank 4 scaled 2.0 and rank 2 scaled 0.25 exercise alpha != r and alpha_pattern
    mods["model.layers.0.self_attn.q_proj"].scaling = 2.0
    mods["model.layers.0.self_attn.v_proj"].scaling = 0.25
    cfg = write_adapter(tmp_path / "a", mods)
    model = load_peft(tiny_llama(attention_bias=bias), tmp_path / "a")

    layers = peft_lora_layers(model)
    assert set(layers) == set(mods)  # PEFT adapted exactly our modules, no more
    for name, m in mods.items():
        layer = layers[name]
        A, B, b = peft_tensors(layer)
        assert torch.equal(A, m.A) and torch.equal(B, m.B)
        assert layer.r["default"] == m.rank == cfg.rank_for(name)
        assert layer.scaling["default"] == m.scaling == cfg.scaling_for(name)
        if bias:
            assert torch.equal(b, m.bias)
        else:
            assert b is None

    # the delta PEFT merges is scaling * B @ A (+ scaling * bias): what our LoraModule says
    base = tiny_llama(attention_bias=bias)
    merged = model.merge_and_unload()
    for name, m in mods.items():
        w0 = base.get_submodule(name).weight
        w1 = merged.get_submodule(name).weight
        torch.testing.assert_close(w1 - w0, m.scaling * m.B @ m.A, rtol=1e-5, atol=1e-6)
        if bias:
            b0, b1 = base.get_submodule(name).bias, merged.get_submodule(name).bias
            torch.testing.assert_close(b1 - b0, m.scaling * m.bias, rtol=1e-5, atol=1e-6)
    # negative control: the unscaled product is not what PEFT merged
    q = "model.layers.0.self_attn.q_proj"
    diff = merged.get_submodule(q).weight - base.get_submodule(q).weight
    assert not torch.allclose(diff, mods[q].B @ mods[q].A, rtol=1e-5, atol=1e-6)


def test_peft_loads_embedding_and_modules_to_save(tmp_path):
    mods = {
        "model.embed_tokens": emb("model.embed_tokens", VOCAB, HIDDEN, 3, seed=1),
        "model.layers.1.mlp.down_proj": lin("model.layers.1.mlp.down_proj", HIDDEN, INTER, 2, seed=2),
    }
    head = torch.randn(VOCAB, HIDDEN)
    write_adapter(tmp_path / "a", mods, full_tensors={"lm_head.weight": head})
    model = load_peft(tiny_llama(), tmp_path / "a")
    layers = peft_lora_layers(model)
    assert set(layers) == set(mods)
    for name, m in mods.items():
        A, B, _ = peft_tensors(layers[name])
        assert torch.equal(A, m.A) and torch.equal(B, m.B)
        assert layers[name].scaling["default"] == 1.0
    wrapped = model.base_model.model.lm_head
    assert torch.equal(wrapped.modules_to_save["default"].weight, head)
    assert not torch.equal(wrapped.original_module.weight, head)  # control: the base head is untouched


@pytest.mark.parametrize("rename, message", [
    # an adapter name other than PEFT's "default" left in the key
    (lambda k: k.replace(".lora_A.weight", ".lora_A.trained.weight"), r"lora_A\.trained\.weight"),
    # the PeftModel prefix missing
    (lambda k: k.removeprefix("base_model.model.") if "lora_A" in k else k, "does not start with"),
])
def test_wrong_key_is_ignored_by_peft_but_refused_by_us(tmp_path, rename, message):
    q = "model.layers.0.self_attn.q_proj"
    write_adapter(tmp_path / "a", {q: lin(q, HIDDEN, HIDDEN, 4, seed=5)})
    ours = read_adapter(tmp_path / "a")[1][q]
    edit_weights(tmp_path / "a", lambda sd: {rename(k): v for k, v in sd.items()})

    model = load_peft(tiny_llama(), tmp_path / "a")
    A, B, _ = peft_tensors(peft_lora_layers(model)[q])
    assert torch.equal(B, ours.B) and not torch.equal(A, ours.A)  # PEFT silently half-loaded it
    with pytest.raises(AdapterError, match=message):
        read_adapter(tmp_path / "a")


# ----------------------------------------------------------------------------- we read what PEFT writes

PEFT_CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 3, r"model\.layers\.[01]\.self_attn\.o_proj": 6},
        alpha_pattern={"o_proj": 5, r"layers\.0\..*q_proj": 7},
    ),
    "rslora_patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                            rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3}),
    "dora": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "up_proj"]),
    "regex_targets": dict(r=2, lora_alpha=2, target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"),
    "layers_to_transform": dict(r=2, target_modules=["k_proj"], layers_to_transform=[1]),
    "embedding_and_head": dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
    "lora_bias": dict(r=2, target_modules=["q_proj", "o_proj"], lora_bias=True, bias="lora_only"),
    "bias_all": dict(r=2, target_modules=["k_proj"], bias="all"),
    "gpt2_conv1d": dict(r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
}


@pytest.mark.parametrize("case", list(PEFT_CONFIGS))
def test_read_what_peft_saved(tmp_path, case):
    kwargs = PEFT_CONFIGS[case]
    def make_model():
        return tiny_gpt2() if case.startswith("gpt2") else tiny_llama(attention_bias="bias" in case)

    model = make_model()
    # init_lora_weights=False: random, non-zero A and B, so tensor comparisons mean something
    out = save_peft(model, LoraConfig(init_lora_weights=False, **kwargs), tmp_path / "peft")
    pm = load_peft(make_model(), out)
    layers = peft_lora_layers(pm)

    cfg, mods, full = read_adapter(out)
    assert set(mods) == set(layers) and mods
    for name, layer in layers.items():
        m = mods[name]
        assert cfg.rank_for(name) == layer.r["default"] == m.rank
        assert cfg.scaling_for(name) == layer.scaling["default"] == m.scaling
        A, B, b = peft_tensors(layer)
        assert torch.equal(m.A, A) and torch.equal(m.B, B)
        assert (m.bias is None and b is None) or torch.equal(m.bias, b)
        if cfg.use_dora:
            assert torch.equal(m.magnitude, layer.lora_magnitude_vector["default"].weight)
        else:
            assert m.magnitude is None
    assert cfg.fan_in_fan_out is bool(kwargs.get("fan_in_fan_out"))
    if case == "embedding_and_head":
        assert set(full) == {"lm_head.weight", "model.embed_tokens.weight"}
        assert mods["model.embed_tokens"].kind == "embedding"
        assert torch.equal(full["lm_head.weight"], pm.base_model.model.lm_head.modules_to_save["default"].weight)
    elif case == "lora_bias":  # bias="lora_only" also saves the base biases of the adapted layers
        assert set(full) == {f"{n}.bias" for n in layers}
    elif case == "bias_all":  # every bias of the model is saved whole
        assert len(full) == 8 and all(n.endswith("_proj.bias") for n in full)
    else:
        assert full == {}
    if case == "patterns":
        # negative control: the plain alpha / r rule disagrees with PEFT on pattern-matched modules
        naive = {n: cfg.lora_alpha / cfg.r for n in layers}
        assert any(naive[n] != layers[n].scaling["default"] for n in layers)

    # rewritten by us (rsLoRA scales folded into alpha, patterns by full name), PEFT sees the same adapter
    write_adapter(tmp_path / "ours", mods, fan_in_fan_out=cfg.fan_in_fan_out)
    again = peft_lora_layers(load_peft(make_model(), tmp_path / "ours"))
    assert set(again) == set(layers)
    for name, layer in again.items():
        assert layer.r["default"] == mods[name].rank and layer.scaling["default"] == mods[name].scaling
        assert all(torch.equal(x, y) for x, y in zip(peft_tensors(layer)[:2], peft_tensors(layers[name])[:2]))
        if cfg.use_dora:
            assert torch.equal(layer.lora_magnitude_vector["default"].weight, mods[name].magnitude)


def test_read_committed_fixtures(tiny_llama_lora, tiny_bert_lora):
    for d in (tiny_llama_lora, tiny_bert_lora):
        cfg, mods, _ = read_adapter(d)
        assert mods and all(m.rank == cfg.rank_for(n) for n, m in mods.items())


def test_pattern_semantics_match_peft():
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    pattern = {"layers.1.self_attn.q_proj": 2, "v_proj": 3, r"model\.layers\.[01]\.mlp\..*": 5, "^top$": 7, "q": 9}
    names = ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.0.mlp.up_proj", "x.model.layers.1.mlp.up_proj", "top", "a.top", "a.q", "aq", "q_proj"]
    for n in names:
        assert pattern_value(pattern, n, 1) == pattern.get(get_pattern_key(pattern.keys(), n), 1), n

    configs = [
        dict(target_modules=["q_proj", "layers.0.mlp.up_proj"]),
        dict(target_modules=r".*\.(q|v)_proj"),
        dict(target_modules=["q_proj"], layers_to_transform=[1]),
        dict(target_modules=["q_proj", "up_proj"], exclude_modules=["layers.0.self_attn.q_proj"]),
        dict(target_modules=["q_proj"], modules_to_save=["self_attn"]),
    ]
    for kw in configs:
        ours = parse_adapter_config({"peft_type": "LORA", **kw})
        theirs = LoraConfig(**kw)
        for n in names:
            expect = check_target_module_exists(theirs, n)
            expect = bool(expect) and type(expect).__name__ != "_ExcludedModule"
            assert bool(ours.targets(n)) == expect, (kw, n)


def test_pattern_key_collision_uses_anchored_keys(tmp_path):
    """A full name that is a dotted suffix of another module's name would match both."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Module()
            self.a.b = torch.nn.Linear(8, 8)
            self.x = torch.nn.Module()
            self.x.a = torch.nn.Module()
            self.x.a.b = torch.nn.Linear(8, 8)
            self.y = torch.nn.Linear(8, 8)

    mods = {"a.b": lin("a.b", 8, 8, 2, seed=1), "x.a.b": lin("x.a.b", 8, 8, 4, seed=2), "y": lin("y", 8, 8, 4, seed=3)}
    cfg = write_adapter(tmp_path / "a", mods)
    assert list(cfg.rank_pattern) == [r"^a\.b"]  # plain "a.b" would also give x.a.b rank 2
    assert {n: cfg.rank_for(n) for n in mods} == {"a.b": 2, "x.a.b": 4, "y": 4}
    layers = peft_lora_layers(load_peft(Net(), tmp_path / "a"))
    assert {n: layers[n].r["default"] for n in mods} == {"a.b": 2, "x.a.b": 4, "y": 4}
    assert all(layers[n].scaling["default"] == 1.0 for n in mods)
    # negative control: with the plain key PEFT's own lookup gives x.a.b the wrong rank
    plain = parse_adapter_config({**cfg.raw, "rank_pattern": {"a.b": 2}, "alpha_pattern": {"a.b": 2}})
    assert plain.rank_for("x.a.b") == 2


# ----------------------------------------------------------------------------- refusals: config


@pytest.fixture
def good_adapter(tmp_path) -> Path:
    q = "model.layers.0.self_attn.q_proj"
    write_adapter(tmp_path / "good", {q: lin(q, HIDDEN, HIDDEN, 4)})
    return tmp_path / "good"


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "LOHA"}, "unsupported adapter type LOHA"),
    ({"peft_type": "IA3"}, "unsupported adapter type IA3"),
    ({"peft_type": "PROMPT_TUNING"}, "unsupported adapter type PROMPT_TUNING"),
    ({"peft_type": None}, "no peft_type"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -1}, "r must be a positive integer"),
    ({"r": "8"}, "r must be a positive integer"),
    ({"r": True}, "r must be a positive integer"),
    ({"r": 4.0}, "r must be a positive integer"),
    ({"lora_alpha": "16"}, "lora_alpha must be a finite number"),
    ({"target_modules": "(q_proj"}, "target_modules.* not a valid regular expression"),
    ({"target_modules": [1, 2]}, "target_modules must be"),
    ({"rank_pattern": {"q_proj[": 2}}, "rank_pattern key.* not a valid regular expression"),
    ({"rank_pattern": {"q_proj": 0}}, "values must be positive integers"),
    ({"alpha_pattern": {"q_proj": "x"}}, "values must be finite numbers"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be"),
    ({"init_lora_weights": "pissa_niter_4"}, "modified base model"),
    ({"use_qalora": True}, "use_qalora"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
])
def test_bad_config_is_refused(good_adapter, changes, message):
    read_adapter(good_adapter)  # control: the unmodified adapter is fine
    edit_config(good_adapter, **changes)
    with pytest.raises(AdapterError, match=message):
        read_adapter(good_adapter)


def test_missing_or_broken_files(tmp_path, good_adapter):
    with pytest.raises(AdapterError, match="adapter_config.json"):
        read_adapter_config(tmp_path / "nowhere")
    (good_adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter(good_adapter)
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(AdapterError, match="no adapter_model"):
        read_adapter(d)


# ----------------------------------------------------------------------------- refusals: weights

Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: {k: v for k, v in sd.items() if "lora_B" not in k}, "needs one lora_A/lora_B"),
    (lambda sd: {**sd, f"{Q}.lora_B.weight": torch.randn(HIDDEN, 3)}, "rank mismatch"),
    (lambda sd: {f"{Q}.lora_A.weight": torch.randn(2, HIDDEN), f"{Q}.lora_B.weight": torch.randn(HIDDEN, 2)},
     "rank 2 in the weights but adapter_config.json gives r=4"),
    (lambda sd: {k.removeprefix("base_model.model."): v for k, v in sd.items()}, "does not start with"),
    (lambda sd: {**sd, "base_model.model.model.norm.weight": torch.ones(HIDDEN)}, "unknown key"),
    (lambda sd: {**sd, f"{Q}.lora_B.bias": torch.zeros(HIDDEN)}, "lora_bias is false"),
    (lambda sd: {**sd, f"{Q}.lora_magnitude_vector": torch.ones(HIDDEN)}, "use_dora is false"),
    (lambda sd: {k.replace("layers.0.self_attn.q_proj", "layers.0.mlp.up_proj"): v for k, v in sd.items()},
     "not matched by target_modules"),
    (lambda sd: {k: v.to(torch.int32) for k, v in sd.items()}, "floating point"),
])
def test_bad_weights_are_refused(good_adapter, mutate, message):
    edit_weights(good_adapter, mutate)
    with pytest.raises(AdapterError, match=message):
        read_adapter(good_adapter)


def test_bin_adapter_reads_like_safetensors(tmp_path, good_adapter):
    sd = load_file(good_adapter / "adapter_model.safetensors")
    (good_adapter / "adapter_model.safetensors").unlink()
    torch.save(sd, good_adapter / "adapter_model.bin")
    mods = read_adapter(good_adapter)[1]
    m = mods["model.layers.0.self_attn.q_proj"]
    assert torch.equal(m.A, sd[f"{Q}.lora_A.weight"]) and torch.equal(m.B, sd[f"{Q}.lora_B.weight"])


class _Payload:
    """Unpickling this runs open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_unrun(tmp_path, good_adapter):
    # control: the payload is live; a plain unpickle creates its marker
    live = tmp_path / "live-marker"
    torch.save({f"{Q}.lora_A.weight": _Payload(live)}, tmp_path / "live.bin")
    torch.load(tmp_path / "live.bin", weights_only=False)
    assert live.exists()

    marker = tmp_path / "pwned-marker"
    (good_adapter / "adapter_model.safetensors").unlink()
    torch.save({f"{Q}.lora_A.weight": _Payload(marker), f"{Q}.lora_B.weight": torch.zeros(HIDDEN, 4)},
               good_adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="refused"):
        read_adapter(good_adapter)
    assert not marker.exists()


# ----------------------------------------------------------------------------- refusals: write


def test_write_refuses_bad_input_before_writing(tmp_path):
    q = "model.layers.0.self_attn.q_proj"
    out = tmp_path / "out"
    cases = [
        ({q: lin(q, 16, 16, 4), "model.embed_tokens": LoraModule("model.embed_tokens", "embedding", torch.randn(2, 8),
                                                                   torch.randn(4, 2), torch.zeros(4))}, {},
         "lora_bias on embeddings"),
        ({q: LoraModule(q, "linear", torch.randn(4, 16), torch.randn(16, 3))}, {}, "must be"),
        ({q: LoraModule(q, "conv", torch.randn(4, 16), torch.randn(16, 4))}, {}, "kind"),
        ({"lm_head": lin("lm_head", 16, 16, 2)}, {"lm_head.weight": torch.zeros(64, 16)}, "inside a modules_to_save"),
        ({q: lin(q, 16, 16, 2), "b.c": LoraModule("b.c", "linear", torch.randn(2, 4), torch.randn(4, 2),
                                                  magnitude=torch.ones(4))}, {}, "DoRA magnitude"),
        ({"x.lora_A": lin("x.lora_A", 4, 4, 2)}, {}, "not a valid module name"),
        ({}, {}, "at least one module"),
    ]
    for mods, full, message in cases:
        with pytest.raises(AdapterError, match=message):
            write_adapter(out, mods, full_tensors=full)
        assert not out.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(AdapterError, match="may not set 'r'"):
        write_adapter(out, {q: lin(q, 16, 16, 4)}, extra_config={"r": 8})


def test_write_refuses_existing_output_unless_overwrite(tmp_path):
    q = "model.layers.0.self_attn.q_proj"
    write_adapter(tmp_path / "a", {q: lin(q, 16, 16, 4, seed=1)})
    with pytest.raises(OutputError, match="exists"):
        write_adapter(tmp_path / "a", {q: lin(q, 16, 16, 4, seed=2)})
    assert torch.equal(read_adapter(tmp_path / "a")[1][q].A, lin(q, 16, 16, 4, seed=1).A)  # untouched
    write_adapter(tmp_path / "a", {q: lin(q, 16, 16, 4, seed=2)}, overwrite=True)
    assert torch.equal(read_adapter(tmp_path / "a")[1][q].A, lin(q, 16, 16, 4, seed=2).A)


def test_bias_is_written_for_every_linear_module(tmp_path):
    """PEFT gives every LoRA linear a bias when lora_bias is on; we store explicit zeros."""
    mods = llama_modules(bias=False)
    first = "model.layers.0.self_attn.q_proj"
    mods[first].bias = torch.randn(HIDDEN)
    write_adapter(tmp_path / "a", mods)
    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert set(sd) == set(adapter_state_dict(mods)) | {
        f"{module_key_prefix(n)}.lora_B.bias" for n in mods if n != first}
    cfg, got, _ = read_adapter(tmp_path / "a")
    assert cfg.lora_bias and torch.equal(got[first].bias, mods[first].bias)
    assert all(torch.count_nonzero(got[n].bias) == 0 for n in mods if n != first)


# ----------------------------------------------------------------------------- hardening


@pytest.mark.parametrize("key,value", [
    ("target_modules", "([a-z_.0-9]*)*X"),
    ("rank_pattern", {"([a-z_.0-9]*)*X": 2}),
    ("alpha_pattern", {"(a+)+b": 2}),
    ("modules_to_save", ["([a-z_.0-9]*)*X"]),
    ("exclude_modules", "(.*)+x"),
    ("layers_pattern", "(l+)+"),
    ("target_modules", "a" * 1001),
])
def test_catastrophic_regex_is_refused_before_matching(key, value):
    import time

    from surgery.core.peft_format import parse_adapter_config

    t0 = time.perf_counter()
    with pytest.raises(AdapterError) as e:
        parse_adapter_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], key: value})
    assert time.perf_counter() - t0 < 1.0 and "\n" not in str(e.value)
    # negative control: an ordinary pattern in the same place is accepted
    ok = {"target_modules": r".*\.q_proj", "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 2},
          "modules_to_save": ["lm_head"], "exclude_modules": "x", "layers_pattern": "layers"}[key]
    parse_adapter_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], key: ok})


@pytest.mark.parametrize("key", ["r", "lora_alpha"])
def test_huge_numbers_are_one_line_adapter_errors(tmp_path, key):
    from surgery.core.peft_format import read_adapter_config

    (tmp_path / "adapter_config.json").write_text(
        '{{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "{}": {}}}'.format(key, "9" * 400))
    with pytest.raises(AdapterError, match=r"adapter_config\.json") as e:
        read_adapter_config(tmp_path)
    assert "\n" not in str(e.value)
    # the same value reaching the parser (another JSON source) is refused by name, not by OverflowError
    from surgery.core.peft_format import parse_adapter_config

    with pytest.raises(AdapterError, match=f"{key} must be"):
        parse_adapter_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, key: 10**400})
    assert parse_adapter_config({"peft_type": "LORA", key: 16}).raw[key] == 16  # negative control
