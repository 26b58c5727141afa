"""surgery merge: PEFT's merge_and_unload is the oracle; transformers loads every output."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from fixtures.make_fixtures import BERT_TARGETS, _load_hf_model, make_peft_adapter
from surgery.errors import AdapterError, OptionError, OutputError, ValidationError
from surgery.io import LazyReader, open_checkpoint
from surgery.ops.merge import apply_adapters_to_model, merge, merged_state_dict_iter

warnings.filterwarnings("ignore", module="peft")


# ----------------------------------------------------------------------------- helpers


def load_dir(path) -> dict[str, torch.Tensor]:
    with LazyReader(open_checkpoint(path)) as r:
        return dict(r.iter())


def peft_merged(base_dir, adapters, weights=None):
    """PEFT's own merge, adapter after adapter; a weight scales that adapter's `scaling`."""
    from peft import PeftModel

    model = _load_hf_model(Path(base_dir))
    for ad, w in zip(adapters, weights or [1.0] * len(adapters)):
        pm = PeftModel.from_pretrained(model, ad)
        for mod in pm.modules():
            if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
                mod.scaling["default"] *= w
        model = pm.merge_and_unload()
    return model.eval()


def max_diff(ours: dict, ref: dict) -> float:
    # non-persistent buffers (MiniLM's int64 position_ids) are in the file but not in state_dict()
    assert all(not ours[k].is_floating_point() for k in set(ours) - set(ref)), set(ours) - set(ref)
    return max((ours[k].double() - ref[k].double()).abs().max().item()
               for k in ours if ours[k].is_floating_point())


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (ordinal of the bit pattern)."""
    def ordinal(x):
        i = x.to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)
    return int((ordinal(a) - ordinal(b)).abs().max())


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |x| (8 significant bits)."""
    e = torch.floor(torch.log2(x.float().abs().clamp_min(2.0**-126)))
    return torch.exp2(e - 7)


def logits(model_dir_or_model, ids):
    import transformers

    m = model_dir_or_model
    if not isinstance(m, torch.nn.Module):
        cfg = json.loads((Path(m) / "config.json").read_text())
        m = getattr(transformers, cfg["architectures"][0]).from_pretrained(m, dtype="auto").eval()
    with torch.no_grad():
        out = m(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def randomize_embedding_lora(adapter_dir: Path, seed: int = 0) -> None:
    """PEFT initialises lora_embedding_A to zeros; draw it so the delta is non-zero."""
    f = adapter_dir / "adapter_model.safetensors"
    sd = load_file(f)
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if k.endswith("lora_embedding_A"):
            sd[k] = torch.randn(v.shape, generator=g).to(v.dtype) * 0.1
    save_file(sd, f, metadata={"format": "pt"})


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 2]])


# ----------------------------------------------------------------------------- equality with PEFT


def test_bert_fp32_matches_peft_and_transformers_loads(tiny_bert, tiny_bert_lora, tmp_path):
    res = merge(tiny_bert, [tiny_bert_lora], tmp_path / "m")
    ours = load_dir(tmp_path / "m")
    ref = peft_merged(tiny_bert, [tiny_bert_lora])
    assert max_diff(ours, ref.state_dict()) <= 1e-6
    assert len(res.changed) == res.adapters[0].modules == 13  # 2 layers x 6 + pooler.dense
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"config.json", "tokenizer.json", "model.safetensors"}
    assert torch.allclose(logits(tmp_path / "m", IDS), logits(ref, IDS), atol=1e-6, rtol=0)
    # negative control: the unmerged base is far from PEFT's merge
    assert max_diff(load_dir(tiny_bert), ref.state_dict()) > 1e-3


def test_llama_bf16_sharded_bit_identical(tiny_llama, tiny_llama_lora, tmp_path):
    res = merge(tiny_llama, [tiny_llama_lora], tmp_path / "m")
    assert res.shards == 3 and len(list((tmp_path / "m").glob("model-*-of-00003.safetensors"))) == 3
    ours = load_dir(tmp_path / "m")
    ref = peft_merged(tiny_llama, [tiny_llama_lora]).state_dict()
    assert all(ours[k].dtype == torch.bfloat16 for k in ours)
    assert all(torch.equal(ours[k], ref[k]) for k in ours)  # one rounding of fp32 W+Δ, as PEFT
    assert torch.equal(logits(tmp_path / "m", IDS), logits(peft_merged(tiny_llama, [tiny_llama_lora]), IDS))
    # negative control: rounding the delta to bf16 before adding (two roundings) is detectably different
    base = load_dir(tiny_llama)
    k = "model.layers.0.self_attn.q_proj.weight"
    two = base[k] + (ours[k].float() - base[k].float()).to(torch.bfloat16)
    assert not torch.equal(two, ref[k])


def test_gpt2_conv1d_fan_in_fan_out(tiny_gpt2, tmp_path):
    ad = make_peft_adapter(tiny_gpt2, tmp_path / "ad", ["c_attn", "c_proj", "c_fc"], seed=5,
                           fan_in_fan_out=True, b_std=0.05)
    merge(tiny_gpt2, [ad], tmp_path / "m")
    ours = load_dir(tmp_path / "m")
    ref = peft_merged(tiny_gpt2, [ad])
    assert "lm_head.weight" not in ours  # still tied
    assert max_diff(ours, ref.state_dict()) <= 1e-6
    assert torch.allclose(logits(tmp_path / "m", IDS), logits(ref, IDS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("targets", [["wte"], ["lm_head"]])
def test_gpt2_tied_embedding_and_head(tiny_gpt2, tmp_path, targets):
    ad = make_peft_adapter(tiny_gpt2, tmp_path / "ad", targets, seed=6, b_std=0.05)
    if targets == ["wte"]:
        randomize_embedding_lora(ad)
    res = merge(tiny_gpt2, [ad], tmp_path / "m")
    assert res.changed == ["transformer.wte.weight"]
    ours = load_dir(tmp_path / "m")
    ref = peft_merged(tiny_gpt2, [ad])
    assert "lm_head.weight" not in ours
    assert max_diff(ours, ref.state_dict()) <= 1e-6
    assert torch.allclose(logits(tmp_path / "m", IDS), logits(ref, IDS), atol=1e-5, rtol=0)
    assert max_diff(load_dir(tiny_gpt2), ref.state_dict()) > 1e-3  # negative control


def test_rslora_rank_alpha_pattern_lora_bias(tiny_bert, tmp_path):
    ad = make_peft_adapter(
        tiny_bert, tmp_path / "ad", BERT_TARGETS, r=4, alpha=8, seed=7, use_rslora=True,
        rank_pattern={"layer.1.attention.self.query": 2, "value": 6}, alpha_pattern={"key": 3},
        lora_bias=True,
    )
    sd = load_file(ad / "adapter_model.safetensors")  # PEFT zero-inits lora_B.bias; give it values
    sd = {k: (torch.randn(v.shape) * 0.1 if k.endswith("lora_B.bias") else v) for k, v in sd.items()}
    save_file(sd, ad / "adapter_model.safetensors", metadata={"format": "pt"})
    res = merge(tiny_bert, [ad], tmp_path / "m")
    ours, ref = load_dir(tmp_path / "m"), peft_merged(tiny_bert, [ad]).state_dict()
    assert max_diff(ours, ref) <= 1e-6
    assert any(n.endswith("query.bias") for n in res.changed)
    # negative control: plain alpha/r scaling instead of rsLoRA's alpha/sqrt(r)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["use_rslora"] = False
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    merge(tiny_bert, [ad], tmp_path / "wrong")
    assert max_diff(load_dir(tmp_path / "wrong"), ref) > 1e-4


def test_dora_llama_bf16_and_gpt2_conv1d_embedding(tiny_llama, tiny_gpt2, tmp_path):
    ad = make_peft_adapter(tiny_llama, tmp_path / "dl", ["q_proj", "v_proj", "down_proj"], seed=8,
                           use_dora=True, b_std=0.05)
    merge(tiny_llama, [ad], tmp_path / "ml")
    ours, ref = load_dir(tmp_path / "ml"), peft_merged(tiny_llama, [ad]).state_dict()
    assert max(bf16_ulps(ours[k], ref[k]) for k in ours) <= 1
    ad2 = make_peft_adapter(tiny_gpt2, tmp_path / "dg", ["c_attn", "wte"], seed=9, use_dora=True,
                            fan_in_fan_out=True, b_std=0.05)
    randomize_embedding_lora(ad2)
    # PEFT computed the magnitude from a zero embedding delta; perturb it so DoRA's rescale is non-trivial
    sd = load_file(ad2 / "adapter_model.safetensors")
    sd = {k: (v * 1.1 if k.endswith("lora_magnitude_vector") else v) for k, v in sd.items()}
    save_file(sd, ad2 / "adapter_model.safetensors", metadata={"format": "pt"})
    merge(tiny_gpt2, [ad2], tmp_path / "mg")
    ours, ref_model = load_dir(tmp_path / "mg"), peft_merged(tiny_gpt2, [ad2])
    assert max_diff(ours, ref_model.state_dict()) <= 1e-6
    assert torch.allclose(logits(tmp_path / "mg", IDS), logits(ref_model, IDS), atol=1e-5, rtol=0)
    # negative control: the same factors merged as plain LoRA (no magnitude) differ
    sd = {k: v for k, v in sd.items() if not k.endswith("lora_magnitude_vector")}
    save_file(sd, ad2 / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((ad2 / "adapter_config.json").read_text())
    (ad2 / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    merge(tiny_gpt2, [ad2], tmp_path / "plain")
    assert max_diff(load_dir(tmp_path / "plain"), ref_model.state_dict()) > 1e-3


def test_two_adapters_weighted(tiny_bert, tmp_path):
    a = make_peft_adapter(tiny_bert, tmp_path / "a", ["query", "value"], seed=10, b_std=0.05)
    b = make_peft_adapter(tiny_bert, tmp_path / "b", ["value", "dense"], r=2, seed=11, b_std=0.05)
    res = merge(tiny_bert, [a, b], tmp_path / "m", weights=[0.5, -1.5])
    ref = peft_merged(tiny_bert, [a, b], [0.5, -1.5]).state_dict()
    assert max_diff(load_dir(tmp_path / "m"), ref) <= 1e-6
    assert [r.weight for r in res.adapters] == [0.5, -1.5]
    # negative controls: default weights, and weight 0 (a no-op) are detectably different
    merge(tiny_bert, [a, b], tmp_path / "w1")
    assert max_diff(load_dir(tmp_path / "w1"), ref) > 1e-4
    merge(tiny_bert, [a, b], tmp_path / "w0", weights=[0, 0])
    base = load_dir(tiny_bert)
    zero = load_dir(tmp_path / "w0")
    assert all(torch.equal(zero[k], base[k]) for k in base)
    assert max_diff(zero, ref) > 1e-4


def test_resized_vocab_modules_to_save(tiny_llama, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = _load_hf_model(tiny_llama)
    model.resize_token_embeddings(136, mean_resizing=False)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                          modules_to_save=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(tmp_path / "ad")
    res = merge(tiny_llama, [tmp_path / "ad"], tmp_path / "m")
    assert res.vocab_size == 136
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == 136
    ref_base = _load_hf_model(tiny_llama)
    ref_base.resize_token_embeddings(136, mean_resizing=False)
    ref = PeftModel.from_pretrained(ref_base, tmp_path / "ad").merge_and_unload()
    ours = load_dir(tmp_path / "m")
    assert ours["model.embed_tokens.weight"].shape == (136, 32)
    assert all(torch.equal(ours[k], ref.state_dict()[k]) for k in ours)
    assert torch.equal(logits(tmp_path / "m", IDS), logits(ref, IDS))


def test_minilm_real_checkpoint(minilm_dir, tmp_path):
    ad = make_peft_adapter(minilm_dir, tmp_path / "ad", ["query", "value"], r=8, alpha=16, seed=12)
    merge(minilm_dir, [ad], tmp_path / "m")
    ref = peft_merged(minilm_dir, [ad])
    assert max_diff(load_dir(tmp_path / "m"), ref.state_dict()) <= 1e-6
    assert torch.allclose(logits(tmp_path / "m", IDS), logits(ref, IDS), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- unmerge, dtypes, in-memory


def test_unmerge_round_trip(tiny_bert, tiny_bert_lora, tiny_llama, tiny_llama_lora, tmp_path):
    merge(tiny_bert, [tiny_bert_lora], tmp_path / "m")
    merge(tmp_path / "m", [tiny_bert_lora], tmp_path / "u", unmerge=True)
    base, back = load_dir(tiny_bert), load_dir(tmp_path / "u")
    assert max_diff(back, base) <= 1e-6
    assert max_diff(load_dir(tmp_path / "m"), base) > 1e-3  # negative control
    merge(tiny_llama, [tiny_llama_lora], tmp_path / "lm")
    merge(tmp_path / "lm", [tiny_llama_lora], tmp_path / "lu", unmerge=True)
    base, back, merged = load_dir(tiny_llama), load_dir(tmp_path / "lu"), load_dir(tmp_path / "lm")
    # bf16: storing W+Δ loses up to half an ulp of |W+Δ| (not of |W|), and the unmerge rounds once more
    for k in base:
        err = (back[k].float() - base[k].float()).abs()
        assert bool((err <= bf16_spacing(merged[k]) + bf16_spacing(base[k])).all()), k
    k = "model.layers.0.self_attn.q_proj.weight"  # negative control: the merged tensor fails that bound
    assert not bool(((merged[k].float() - base[k].float()).abs() <= 2 * bf16_spacing(merged[k])).all())


def test_dora_unmerge_refused(tiny_llama, tmp_path):
    ad = make_peft_adapter(tiny_llama, tmp_path / "d", ["q_proj"], seed=13, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        merge(tiny_llama, [ad], tmp_path / "u", unmerge=True)
    assert not (tmp_path / "u").exists()


def test_mixed_dtypes_and_int_passthrough(tiny_bert, tiny_bert_lora, tmp_path):
    sd = load_dir(tiny_bert)
    sd["encoder.layer.0.attention.self.query.weight"] = sd["encoder.layer.0.attention.self.query.weight"].half()
    sd["encoder.layer.1.attention.self.value.weight"] = sd["encoder.layer.1.attention.self.value.weight"].bfloat16()
    sd["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    (tmp_path / "base").mkdir()
    save_file(sd, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "base" / "config.json").write_text((tiny_bert / "config.json").read_text())
    merge(tmp_path / "base", [tiny_bert_lora], tmp_path / "m")
    out = load_dir(tmp_path / "m")
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in sd.items()}
    assert torch.equal(out["embeddings.position_ids"], sd["embeddings.position_ids"])
    merge(tmp_path / "base", [tiny_bert_lora], tmp_path / "m32", dtype="fp32")
    out32 = load_dir(tmp_path / "m32")
    assert all(v.dtype == torch.float32 for k, v in out32.items() if k != "embeddings.position_ids")
    assert out32["embeddings.position_ids"].dtype == torch.int64
    assert json.loads((tmp_path / "m32" / "config.json").read_text())["dtype"] == "float32"


def test_shard_size_option(tiny_llama, tiny_llama_lora, tmp_path):
    res = merge(tiny_llama, [tiny_llama_lora], tmp_path / "one", shard_size="10MB")
    assert res.shards == 1 and (tmp_path / "one" / "model.safetensors").is_file()


def test_in_memory_helpers_equal_disk(tiny_bert, tiny_bert_lora, tmp_path):
    merge(tiny_bert, [tiny_bert_lora], tmp_path / "m", weights=[0.7])
    disk = load_dir(tmp_path / "m")
    streamed = dict(merged_state_dict_iter(tiny_bert, [tiny_bert_lora], weights=[0.7]))
    assert all(torch.equal(streamed[k], disk[k]) for k in disk)
    model = _load_hf_model(tiny_bert)
    rep = apply_adapters_to_model(model, [tiny_bert_lora], [0.7])
    assert len(rep["changed"]) == 13
    sd = model.state_dict()
    assert all(torch.equal(sd[k], disk[k]) for k in disk)


# ----------------------------------------------------------------------------- errors


def _edit_adapter(src: Path, dst: Path, fn_sd=None, fn_cfg=None) -> Path:
    dst.mkdir()
    sd = load_file(src / "adapter_model.safetensors")
    cfg = json.loads((src / "adapter_config.json").read_text())
    sd = fn_sd(sd) if fn_sd else sd
    cfg = fn_cfg(cfg) if fn_cfg else cfg
    save_file(sd, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _rename(sd, old, new):
    return {k.replace(old, new): v for k, v in sd.items()}


@pytest.mark.parametrize("case,exc,match", [
    ("unmatched", AdapterError, "no weight 'encoder.layer.7"),
    ("shape", AdapterError, "shape mismatch"),
    ("loha", AdapterError, "LOHA"),
    ("nan", ValidationError, "non-finite"),
])
def test_errors_leave_no_output(tiny_bert, tiny_bert_lora, tmp_path, case, exc, match):
    key_b = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"
    edits = {
        "unmatched": dict(fn_sd=lambda sd: _rename(sd, "encoder.layer.1.", "encoder.layer.7.")),
        "shape": dict(fn_sd=lambda sd: {**sd, key_b: torch.zeros(16, 4)}),
        "loha": dict(fn_cfg=lambda c: {**c, "peft_type": "LOHA"}),
        "nan": dict(fn_sd=lambda sd: {**sd, key_b: torch.full_like(sd[key_b], float("nan"))}),
    }
    ad = _edit_adapter(tiny_bert_lora, tmp_path / "ad", **edits[case])
    with pytest.raises(exc, match=match):
        merge(tiny_bert, [ad], tmp_path / "out")
    assert list(tmp_path.iterdir()) == [tmp_path / "ad"]  # no output, no temp dir


@pytest.mark.parametrize("edit,note", [
    (lambda c: {**c, "rank_pattern": {"nonexistent": 4}}, "rank_pattern key 'nonexistent'"),
    (lambda c: {**c, "alpha_pattern": {"nonexistent": 4}}, "alpha_pattern key 'nonexistent'"),
    (lambda c: {**c, "target_modules": [*c["target_modules"], "q_proj"]}, "target_modules entry 'q_proj'"),
])
def test_config_entries_matching_nothing_merge_with_a_note(tiny_bert, tiny_bert_lora, tmp_path, edit, note):
    """PEFT merges an adapter whose config names modules the base lacks (it ignores them): so do we,
    with a note; the output equals the unedited adapter's merge. Unknown tensor keys stay refused."""
    ad = _edit_adapter(tiny_bert_lora, tmp_path / "ad", fn_cfg=edit)
    res = merge(tiny_bert, [ad], tmp_path / "out")
    assert any(note in n and "matches no module" in n for n in res.notes)
    ref = merge(tiny_bert, [tiny_bert_lora], tmp_path / "ref")
    assert not any("matches no module" in n for n in ref.notes)  # negative control
    a, b = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_option_errors(tiny_bert, tiny_bert_lora, tmp_path):
    with pytest.raises(OptionError, match="weight"):
        merge(tiny_bert, [tiny_bert_lora], tmp_path / "o", weights=[1.0, 2.0])
    with pytest.raises(OptionError, match="size"):
        merge(tiny_bert, [tiny_bert_lora], tmp_path / "o", shard_size="5XB")
    (tmp_path / "o").mkdir()
    with pytest.raises(OutputError, match="--overwrite"):
        merge(tiny_bert, [tiny_bert_lora], tmp_path / "o")
    merge(tiny_bert, [tiny_bert_lora], tmp_path / "o", overwrite=True)
    with pytest.raises(Exception, match="adapter, not a base"):
        merge(tiny_bert_lora, [tiny_bert_lora], tmp_path / "p")


# ----------------------------------------------------------------------------- CLI


def _cli(args):
    from surgery.cli.main import cli

    return CliRunner().invoke(cli, args)


def test_cli_ok_json_and_inputs_unchanged(tiny_llama, tiny_llama_lora, tmp_path):
    before = (tree_hash(tiny_llama), tree_hash(tiny_llama_lora))
    r = _cli(["merge", str(tiny_llama), str(tiny_llama_lora), "-o", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["shards"] == 3 and data["tensors_changed"] == 14
    assert (tree_hash(tiny_llama), tree_hash(tiny_llama_lora)) == before
    r = _cli(["merge", str(tiny_llama), str(tiny_llama_lora), "-o", str(tmp_path / "m")])
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    r = _cli(["merge", str(tiny_llama), str(tiny_llama_lora), "-o", str(tmp_path / "m"), "--overwrite",
              "--dtype", "fp32", "--weight", "0.5"])
    assert r.exit_code == 0, r.output
    assert "merged" in r.stdout


@pytest.mark.parametrize("extra,code,needle", [
    (["--shard-size", "5XB"], 2, "invalid size"),
    (["--weight", "1", "--weight", "2"], 2, "weight"),
    (["--weight", "nan"], 2, "finite"),
    (["--dtype", "int8"], 2, "int8"),
])
def test_cli_bad_options_exit_2(tiny_bert, tiny_bert_lora, tmp_path, extra, code, needle):
    r = _cli(["merge", str(tiny_bert), str(tiny_bert_lora), "-o", str(tmp_path / "m"), *extra])
    assert r.exit_code == code, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m").exists()


def test_cli_bad_input_exit_1(tiny_bert, tmp_path):
    r = _cli(["merge", str(tiny_bert), str(tmp_path / "missing"), "-o", str(tmp_path / "m")])
    assert r.exit_code == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in r.output


@pytest.mark.parametrize("base_name,ft_name", [("tiny_gpt2", "tiny_gpt2_ft"), ("tiny_llama", "tiny_llama_ft")])
def test_extracted_adapter_merges_like_peft(request, tmp_path, base_name, ft_name):
    """Adapters written by `surgery extract-lora` (full-rank: exact) merge back to the fine-tune."""
    from surgery.ops.extract import extract_lora

    base, ft = request.getfixturevalue(base_name), request.getfixturevalue(ft_name)
    extract_lora(base, ft, tmp_path / "ad", rank=64)
    merge(base, [tmp_path / "ad"], tmp_path / "m")
    ours, ref = load_dir(tmp_path / "m"), peft_merged(base, [tmp_path / "ad"]).state_dict()
    target = load_dir(ft)
    if "lm_head.weight" not in target and "lm_head.weight" in ours:  # ft ties its head; ours is untied
        target["lm_head.weight"] = target["transformer.wte.weight"]
    assert max_diff(ours, ref) <= 1e-6 and all(torch.equal(ours[k], ref[k]) for k in ours if k in ref)
    ref_model = peft_merged(base, [tmp_path / "ad"])
    assert torch.allclose(logits(tmp_path / "m", IDS), logits(ref_model, IDS), atol=1e-5, rtol=0)
    assert max_diff(ours, target) <= 2e-2  # extraction is exact up to float rounding of full-rank factors
    assert max_diff(load_dir(base), target) > max_diff(ours, target)  # negative control


def test_device_cuda_without_gpu_is_an_option_error(tiny_bert, tiny_bert_lora, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(OptionError, match="cuda"):
        merge(tiny_bert, [tiny_bert_lora], tmp_path / "m", device="cuda")


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st


@settings(max_examples=30, deadline=None)
@given(out=st.integers(1, 12), inp=st.integers(1, 12), r=st.integers(1, 4), fifo=st.booleans(),
       w=st.floats(-3, 3), seed=st.integers(0, 2**16))
def test_property_unmerge_inverts_merge(out, inp, r, fifo, w, seed):
    from surgery.core.peft_format import LoraModule
    from surgery.ops.merge import _apply_ops, _Op

    g = torch.Generator().manual_seed(seed)
    W = torch.randn((inp, out) if fifo else (out, inp), generator=g)
    m = LoraModule("m", "linear", torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), scaling=0.5)
    ops = [_Op(0, "lora", w, module=m, fifo=fifo)]
    merged = _apply_ops(W, ops, False, torch.device("cpu"))
    back = _apply_ops(merged, ops, True, torch.device("cpu"))
    torch.testing.assert_close(back, W, atol=1e-5 * (1 + merged.abs().max().item()), rtol=0)
    expected = W + w * 0.5 * ((m.B @ m.A).T if fifo else m.B @ m.A)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------- PEFT matrix follow-ups (zoo adapters)


def _zoo_case(case_id: str, tmp_path: Path):
    """(base dir, [adapter dirs], PEFT's merged state dict) of a tests/test_peft_matrix.py case."""
    from tests.test_peft_matrix import CASES, _build, _peft_merged, _state

    case = next(c for c in CASES if c.id == case_id)
    base, adapters = _build(case, tmp_path)
    return base, adapters, _state(_peft_merged(base, adapters, case.weights, case.dtype))


def test_tied_embedding_modules_to_save_unties_in_memory(tmp_path):
    """apply_adapters_to_model (export-onnx --adapter) unties like merge: the head keeps the base values."""
    from tests.test_peft_matrix import _load

    base, adapters, truth = _zoo_case("llama-tied-mts-embed", tmp_path)
    model, _ = _load(base, torch.float32)
    res = apply_adapters_to_model(model, adapters)
    assert "lm_head.weight" in res["changed"]
    mine = {k: v.detach() for k, v in model.state_dict().items()}
    assert all(torch.equal(mine[k], truth[k]) for k in truth)
    assert not torch.equal(mine["lm_head.weight"], mine["model.embed_tokens.weight"])  # negative control
    assert model.config.tie_word_embeddings is False
    out = merge(base, adapters, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("untied" in n for n in out.notes)


def _zoo_build(case_id: str, tmp_path: Path):
    from tests.test_peft_matrix import CASES, _build

    return _build(next(c for c in CASES if c.id == case_id), tmp_path)


@pytest.mark.parametrize("case_id", ["llama-mts-head", "bert-cls-seqcls", "opt-bias-all", "gpt2-bias-lora-only"])
def test_unmerge_of_trained_full_tensors_is_refused(tmp_path, case_id):
    """The trained tensors (modules_to_save heads, bias="all"/"lora_only" biases) replaced base values the
    adapter does not hold: unmerge must refuse instead of leaving them in the output."""
    base, adapters = _zoo_build(case_id, tmp_path)
    merge(base, adapters, tmp_path / "merged")
    with pytest.raises(AdapterError, match="cannot restore") as e:
        merge(tmp_path / "merged", adapters, tmp_path / "back", unmerge=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("case_id", ["llama-embed-lora", "llama-tied-embed-lora", "llama-tied-embed-lora-tying"])
def test_unmerge_restores_saved_original_embedding(tmp_path, case_id):
    """An embedding-LoRA adapter saves the (frozen) embedding base layer: unmerge restores it exactly."""
    base, adapters = _zoo_build(case_id, tmp_path)
    merge(base, adapters, tmp_path / "merged")
    merge(tmp_path / "merged", adapters, tmp_path / "back", unmerge=True)
    orig, merged, back = load_dir(base), load_dir(tmp_path / "merged"), load_dir(tmp_path / "back")
    emb = "model.embed_tokens.weight"
    assert not torch.equal(merged[emb], orig[emb])  # negative control: the merge changed it
    assert torch.equal(back[emb], orig[emb])


def test_weighted_bf16_bit_identical_to_peft_in_sequence(tmp_path):
    """Weights fold into PEFT's scaling and the adapters apply one after another (rounded between)."""
    from tests.test_peft_matrix import Case, _build, _load, _peft_merged, _state

    case = Case("w-bf16", "llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
                dtype=torch.bfloat16, extra=[dict(target_modules=["v_proj", "o_proj"], r=2, lora_alpha=2,
                                                  use_rslora=True)], weights=[0.7, 0.3])
    base, adapters = _build(case, tmp_path)
    truth = _state(_peft_merged(base, adapters, case.weights, case.dtype))
    merge(base, adapters, tmp_path / "m", weights=case.weights)
    mine = _state(_load(tmp_path / "m", case.dtype)[0])
    assert [k for k in truth if not torch.equal(mine[k], truth[k])] == []
    merge(base, adapters[::-1], tmp_path / "r", weights=case.weights[::-1])  # negative control: other order
    other = _state(_load(tmp_path / "r", case.dtype)[0])
    assert any(not torch.equal(other[k], truth[k]) for k in truth)
