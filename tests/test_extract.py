"""extract-lora: surgery.ops.extract.extract_lora and `surgery extract-lora`.

Oracles: PEFT (PeftModel.from_pretrained loads every adapter we write, and the
adapted base must reproduce the fine-tune), the Eckart–Young bound computed from
torch.linalg.svdvals of the true delta, and the adapter file itself (B·A read
back with safetensors, independent of the library's own report).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from surgery.errors import CheckpointError, OptionError, OutputError, SurgeryError
from surgery.io import LazyReader, open_checkpoint
from surgery.ops.extract import extract_lora

warnings.filterwarnings("ignore", module="peft")

# Token ids valid in every tiny vocabulary (bert/gpt2: 100, llama: 128).
IDS = torch.tensor([[2, 5, 9, 17, 33, 64, 3], [2, 40, 41, 7, 8, 90, 3]])
FULL = 64  # a rank above every dimension of the tiny models: the truncation is exact
FP32_TOL = 1e-4  # max abs diff of fp32 outputs (logits / last_hidden_state)
BF16_TOL = 1e-3  # bf16 adapter factors on a bf16 Llama loaded in fp32 (measured ≈ 8e-5)


# ----------------------------------------------------------------------------- helpers


def load_dir(path) -> dict[str, torch.Tensor]:
    with LazyReader(open_checkpoint(path)) as r:
        return dict(r.iter())


def true_deltas(base, ft) -> dict[str, torch.Tensor]:
    """FT − BASE in fp32, storage layout, for every floating tensor of equal shape."""
    b, f = load_dir(base), load_dir(ft)
    return {k: f[k].float() - b[k].float() for k in b if b[k].is_floating_point() and b[k].shape == f[k].shape}


def tail_bound(delta: torch.Tensor, r: int) -> float:
    """Eckart–Young: the smallest ‖Δ − X‖_F / ‖Δ‖_F over rank-r X, from the singular values."""
    s2 = torch.linalg.svdvals(delta.double()).pow(2)  # (min(m, n),)
    return math.sqrt(float(s2[r:].sum()) / float(s2.sum()))


def write_model(out: Path, tensors: dict[str, torch.Tensor], like: Path, **config_changes) -> Path:
    """A single-file HF model directory: `tensors` + config.json of `like` (with changes)."""
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((Path(like) / "config.json").read_text())
    cfg.update(config_changes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def hf_model(path, causal: bool, fp32: bool = False):
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    return cls.from_pretrained(path, dtype=torch.float32 if fp32 else "auto").eval()


def outputs(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


def peft_model(base_dir, adapter, causal: bool, fp32: bool = False, vocab: int | None = None):
    from peft import PeftModel

    base = hf_model(base_dir, causal, fp32)
    if vocab is not None:
        base.resize_token_embeddings(vocab)
    return PeftModel.from_pretrained(base, adapter).eval()


def lora_layers(pm) -> dict:
    """module name (as in target_modules) -> PEFT LoraLayer."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_deltas(out: Path, conv1d: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """module -> scale·B·A read back from adapter_model.safetensors, in the weight's storage layout.

    Independent of surgery: safetensors + adapter_config.json only. Linear: B·A (out, in);
    Embedding: (B·A)ᵀ (vocab, dim); Conv1D with fan_in_fan_out: (B·A)ᵀ (in, out).
    """
    cfg = json.loads((out / "adapter_config.json").read_text())
    sd = load_file(out / "adapter_model.safetensors")
    deltas = {}
    for key in sd:
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_embedding_A)", key)
        if not m:
            continue
        module, slot = m.groups()
        emb = slot == "lora_embedding_A"
        A = sd[key].float()  # (r, in)
        B = sd[f"base_model.model.{module}." + ("lora_embedding_B" if emb else "lora_B.weight")].float()  # (out, r)
        r = pattern_value(cfg["rank_pattern"], module, cfg["r"])
        alpha = pattern_value(cfg["alpha_pattern"], module, cfg["lora_alpha"])
        assert A.shape[0] == B.shape[1] == r, (module, A.shape, B.shape, r)
        prod = (alpha / r) * (B @ A)  # (out, r) @ (r, in)
        deltas[module] = prod.T if emb or (cfg["fan_in_fan_out"] and module in conv1d) else prod
    return deltas


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def run_cli(args):
    from surgery.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- PEFT oracle, full rank


@pytest.mark.parametrize("model,dtype,tol", [
    ("bert", None, FP32_TOL),
    ("gpt2", None, FP32_TOL),
    ("llama", None, BF16_TOL),   # bf16 factors, compared in fp32
    ("llama", "fp32", FP32_TOL),  # fp32 factors of the bf16 delta: exact up to fp32 rounding
])
def test_full_rank_reproduces_ft_through_peft(request, tmp_path, model, dtype, tol):
    base, ft = request.getfixturevalue(f"tiny_{model}"), request.getfixturevalue(f"tiny_{model}_ft")
    causal = model != "bert"
    res = extract_lora(base, ft, tmp_path / "ad", rank=FULL, svd="exact", dtype=dtype)
    assert res.overall_rel_error < (1e-2 if dtype is None and model == "llama" else 1e-5)

    pm = peft_model(base, tmp_path / "ad", causal, fp32=True)
    y_ft = outputs(hf_model(ft, causal, fp32=True))
    y_base = outputs(hf_model(base, causal, fp32=True))
    y_ad = outputs(pm)
    assert max_diff(y_ad, y_ft) <= tol
    assert max_diff(y_base, y_ft) > 10 * tol  # negative control: the adapter is what closes the gap
    # Every module we wrote became a LoRA layer with its rank and scale exactly 1.
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    layers = lora_layers(pm)
    assert set(layers) == set(cfg["target_modules"]) == {m.module for m in res.modules}
    for rep in res.modules:
        assert layers[rep.module].r["default"] == rep.rank
        assert layers[rep.module].scaling["default"] == 1.0


def test_gpt2_conv1d_orientation_and_tied_head(tiny_gpt2, tiny_gpt2_ft, tmp_path):
    from transformers.pytorch_utils import Conv1D

    res = extract_lora(tiny_gpt2, tiny_gpt2_ft, tmp_path / "ad", rank=FULL, svd="exact", bias="lora")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    # The embedding is saved whole (lora_bias is on), so the tied head is saved whole beside it.
    assert "transformer.wte" in cfg["modules_to_save"] and "lm_head" in cfg["modules_to_save"]
    assert {"transformer.wte.weight", "lm_head.weight"} <= set(res.full)
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert torch.equal(sd["base_model.model.lm_head.weight"], sd["base_model.model.transformer.wte.weight"])
    assert any("lm_head.weight is tied" in n for n in res.notes)

    conv = {n for n, m in hf_model(tiny_gpt2, causal=True).named_modules() if isinstance(m, Conv1D)}
    assert conv and {m.module for m in res.modules} == conv
    assert all(m.kind == "conv1d" for m in res.modules)
    truth = true_deltas(tiny_gpt2, tiny_gpt2_ft)
    for module, d in adapter_deltas(tmp_path / "ad", conv).items():
        t = truth[module + ".weight"]  # (in, out)
        assert float((d - t).norm() / t.norm()) < 1e-5, module
        if d.shape[0] == d.shape[1]:  # negative control: the (out, in) reading is wrong
            assert float((d.T - t).norm() / t.norm()) > 0.1, module


# ----------------------------------------------------------------------------- exact-rank pair


def make_exact_rank_pair(base: Path, out: Path, rank: int = 3) -> Path:
    """tiny-bert + an exact rank-`rank` delta on every Linear weight; nothing else changes."""
    from torch import nn

    linears = {n + ".weight" for n, m in hf_model(base, causal=False).named_modules() if isinstance(m, nn.Linear)}
    tensors = load_file(base / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    for name in sorted(linears):
        w = tensors[name]
        b0 = torch.randn(w.shape[0], rank, generator=gen)  # (out, r)
        a0 = torch.randn(rank, w.shape[1], generator=gen)  # (r, in)
        low = b0 @ a0  # (out, in), rank r
        tensors[name] = w + low * (0.1 * w.norm() / low.norm())
    return write_model(out, tensors, base)


def test_exact_rank_delta_recovered(tiny_bert, tmp_path):
    ft = make_exact_rank_pair(tiny_bert, tmp_path / "ft", rank=3)
    res = extract_lora(tiny_bert, ft, tmp_path / "ad3", rank=3, svd="exact")
    assert len(res.modules) == 13 and not res.full
    # The untouched embeddings are LoRA candidates with a zero delta: skipped, and said so.
    assert all(s["why"] == "delta is zero" and "embeddings" in s["tensor"] for s in res.skipped)
    assert all(m.rank == 3 and m.rel_error < 1e-5 for m in res.modules)
    assert res.overall_rel_error < 1e-5
    y_ft = outputs(hf_model(ft, causal=False))
    assert max_diff(outputs(peft_model(tiny_bert, tmp_path / "ad3", causal=False)), y_ft) <= FP32_TOL
    # Negative control: one rank short is far off, in the report and in the outputs.
    res2 = extract_lora(tiny_bert, ft, tmp_path / "ad2", rank=2, svd="exact")
    assert min(m.rel_error for m in res2.modules) > 0.05
    assert max_diff(outputs(peft_model(tiny_bert, tmp_path / "ad2", causal=False)), y_ft) > 10 * FP32_TOL


# ----------------------------------------------------------------------------- Eckart–Young


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_reported_error_is_eckart_young_and_matches_file(tiny_bert, tiny_bert_ft, tmp_path, svd):
    r = 2
    # --bias skip keeps the embeddings as LoRA, so they are checked too (transposed orientation).
    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", rank=r, svd=svd, bias="skip")
    assert {m.kind for m in res.modules} == {"linear", "embedding"}
    assert all(m.method == svd for m in res.modules)
    truth = true_deltas(tiny_bert, tiny_bert_ft)
    stored = adapter_deltas(tmp_path / "ad")
    assert set(stored) == {m.module for m in res.modules}
    sq_err = sq_tot = 0.0
    for m in res.modules:
        t = truth[m.module + ".weight"]
        bound = tail_bound(t, m.rank)
        if svd == "exact":
            assert math.isclose(m.rel_error, bound, rel_tol=1e-4, abs_tol=1e-6), (m.module, m.rel_error, bound)
        else:
            assert bound - 1e-6 <= m.rel_error <= 1.01 * bound + 1e-6, (m.module, m.rel_error, bound)
        # The report states the error of the factors as written.
        actual = float((t - stored[m.module]).norm() / t.norm())
        assert math.isclose(m.rel_error, actual, rel_tol=1e-4, abs_tol=1e-6), (m.module, m.rel_error, actual)
        assert math.isclose(m.energy_kept, 1 - m.rel_error**2, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(m.delta_norm, float(t.norm()), rel_tol=1e-5)
        # Negative control: the bound of another rank does not match.
        if m.rank < min(t.shape):
            assert abs(tail_bound(t, m.rank + 1) - m.rel_error) > 0.01 * m.rel_error, m.module
        if m.rank > 1:
            assert abs(tail_bound(t, m.rank - 1) - m.rel_error) > 0.01 * m.rel_error, m.module
        sq_err += actual**2 * float(t.norm()) ** 2
        sq_tot += float(t.norm()) ** 2
    assert math.isclose(res.overall_rel_error, math.sqrt(sq_err / sq_tot), rel_tol=1e-4)
    # A module that is not at full rank really has error (the checks above are not vacuous).
    assert max(m.rel_error for m in res.modules) > 0.1


def test_randomized_close_to_exact(tiny_bert, tiny_bert_ft, tmp_path):
    ex = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "e", rank=2, svd="exact", bias="skip")
    rnd = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "r", rank=2, svd="randomized", bias="skip")
    e = {m.module: m.rel_error for m in ex.modules}
    for m in rnd.modules:
        assert m.rel_error <= 1.01 * e[m.module] + 1e-6, (m.module, m.rel_error, e[m.module])
    # Negative control: with no power iterations and the smallest sketch the randomized
    # engine is measurably worse somewhere, so the 1 % check can fail.
    from surgery.core.lowrank import truncated_svd

    worst = 0.0
    for _name, t in true_deltas(tiny_bert, tiny_bert_ft).items():
        if t.dim() == 2 and min(t.shape) > 8:
            res = truncated_svd(t, 2, method="randomized", niter=0, oversample=0, seed=0)
            worst = max(worst, res.rel_error(2) / tail_bound(t, 2))
    assert worst > 1.01


def test_overall_error_covers_the_lora_modules_only(tiny_bert, tiny_bert_ft, tmp_path):
    # --bias lora: the embeddings' LoRAs become whole tensors after the SVD pass;
    # their (lossy) LoRA error must not remain in the overall error.
    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", rank=2, svd="exact", bias="lora")
    assert "embeddings.word_embeddings.weight" in res.full
    assert {m.kind for m in res.modules} == {"linear"}
    err = sum((m.rel_error * m.delta_norm) ** 2 for m in res.modules)
    tot = sum(m.delta_norm**2 for m in res.modules)
    assert math.isclose(res.overall_rel_error, math.sqrt(err / tot), rel_tol=1e-6)
    # Negative control: counting the embeddings' rank-2 error as well gives another number.
    truth = true_deltas(tiny_bert, tiny_bert_ft)
    emb = [truth[f"embeddings.{e}_embeddings.weight"] for e in ("word", "position")]
    err_e = err + sum(tail_bound(t, 2) ** 2 * float(t.norm()) ** 2 for t in emb)
    tot_e = tot + sum(float(t.norm()) ** 2 for t in emb)
    assert abs(math.sqrt(err_e / tot_e) - res.overall_rel_error) > 1e-3


def test_include_exclude(tiny_bert, tiny_bert_ft, tmp_path):
    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", rank=4, include=[r"attention\.self"],
                       exclude=[r"layer\.1\..*value"])
    got = {m.module for m in res.modules}
    assert got == {f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "key", "value")} - {
        "encoder.layer.1.attention.self.value"}
    why = {s["tensor"]: s["why"] for s in res.skipped}
    assert why["encoder.layer.1.attention.self.value.weight"] == "excluded by include/exclude"
    assert why["encoder.layer.0.output.dense.weight"] == "excluded by include/exclude"
    assert why["encoder.layer.0.output.LayerNorm.weight"] == "excluded by include/exclude"
    assert why["embeddings.word_embeddings.weight"] == "excluded by include/exclude"
    assert not res.full  # norms outside the selection are not saved whole
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == got and cfg["modules_to_save"] is None
    assert set(lora_layers(peft_model(tiny_bert, tmp_path / "ad", causal=False))) == got
    # Negative control: without the filters the LayerNorm deltas are saved whole.
    res2 = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad2", rank=4, include=[r"attention\.self"])
    assert len(res2.modules) == 6
    with pytest.raises(OptionError, match="no Linear/Conv1D/Embedding weight is selected"):
        extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad3", rank=4, exclude=["."])
    assert not (tmp_path / "ad3").exists()


# ----------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("embeddings,bias", [("lora", "lora"), ("lora", "skip"), ("full", "lora"), ("skip", "lora")])
def test_embedding_modes(tiny_bert, tiny_bert_ft, tmp_path, embeddings, bias):
    emb = ["embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"]
    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", rank=FULL, svd="exact",
                       embeddings=embeddings, bias=bias)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    keys = set(load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    emb_lora = {e for e in emb if f"base_model.model.{e}.lora_embedding_A" in keys
                and f"base_model.model.{e}.lora_embedding_B" in keys}
    emb_full = {e for e in emb if f"base_model.model.{e}.weight" in keys}
    skipped = {s["tensor"] for s in res.skipped}
    if embeddings == "lora" and bias == "skip":
        assert emb_lora == set(emb) and not emb_full
        assert cfg["lora_bias"] is False and set(emb) <= set(cfg["target_modules"])
        assert any(s.endswith(".bias") for s in skipped)  # the bias deltas were dropped, and said so
    elif embeddings in ("lora", "full"):
        # lora + lora_bias: PEFT has no lora_bias on embeddings, so they are saved whole.
        assert emb_full == set(emb) and not emb_lora
        assert set(emb) <= set(cfg["modules_to_save"]) and cfg["lora_bias"] is True
        if embeddings == "lora":
            assert any("PEFT cannot combine lora_bias" in n for n in res.notes)
    else:
        assert not emb_full and not emb_lora and {e + ".weight" for e in emb} <= skipped
        assert not set(emb) & set(cfg["target_modules"] + (cfg["modules_to_save"] or []))
    pm = peft_model(tiny_bert, tmp_path / "ad", causal=False)
    layers = lora_layers(pm)
    assert emb_lora <= set(layers)
    y_ft, y_base = outputs(hf_model(tiny_bert_ft, causal=False)), outputs(hf_model(tiny_bert, causal=False))
    d_ad, d_base = max_diff(outputs(pm), y_ft), max_diff(y_base, y_ft)
    if bias == "lora" and embeddings != "skip":
        assert d_ad <= FP32_TOL  # every delta is in the adapter
    else:
        # Some deltas dropped (the biases: small; the embeddings: 5 % of the weight): closer, not exact.
        assert d_ad < (0.5 if embeddings == "lora" else 0.9) * d_base
        assert d_ad > FP32_TOL  # negative control: dropping deltas is visible


def _grow(t: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randn(rows, t.shape[1], generator=gen) * float(t.float().std())  # (rows, dim)
    return torch.cat([t, extra.to(t.dtype)])  # (vocab + rows, dim)


@pytest.mark.parametrize("model,grown,new_vocab,tol", [
    ("bert", ["embeddings.word_embeddings.weight"], 105, FP32_TOL),
    ("llama", ["model.embed_tokens.weight", "lm_head.weight"], 136, BF16_TOL),
    ("gpt2", ["transformer.wte.weight"], 104, FP32_TOL),  # tied head follows the embedding
])
def test_vocabulary_growth(request, tmp_path, model, grown, new_vocab, tol):
    base, ft_src = request.getfixturevalue(f"tiny_{model}"), request.getfixturevalue(f"tiny_{model}_ft")
    tensors = load_dir(ft_src)
    for i, name in enumerate(grown):
        tensors[name] = _grow(tensors[name], new_vocab - tensors[name].shape[0], seed=i)
    ft = write_model(tmp_path / "ft", tensors, ft_src, vocab_size=new_vocab)
    res = extract_lora(base, ft, tmp_path / "ad", rank=FULL, svd="exact")
    assert set(grown) <= set(res.full)
    for name in grown:
        assert any(n.startswith(name) and str(new_vocab) in n for n in res.notes), res.notes
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    for name in grown:
        assert torch.equal(sd["base_model.model." + name], tensors[name])  # saved whole, bit for bit
    if model == "gpt2":
        assert torch.equal(sd["base_model.model.lm_head.weight"], tensors["transformer.wte.weight"])

    causal = model != "bert"
    pm = peft_model(base, tmp_path / "ad", causal, fp32=True, vocab=new_vocab)
    ids = torch.cat([IDS, torch.arange(new_vocab - 7, new_vocab)[None]])  # new tokens too
    y_ft = outputs(hf_model(ft, causal, fp32=True), ids)
    assert y_ft.shape[-1] == (new_vocab if causal else y_ft.shape[-1])
    assert max_diff(outputs(pm, ids), y_ft) <= tol
    base_model = hf_model(base, causal, fp32=True)
    base_model.resize_token_embeddings(new_vocab)
    assert max_diff(outputs(base_model, ids), y_ft) > 10 * tol  # negative control


# ----------------------------------------------------------------------------- rank policies


def test_energy_policy_ranks_and_peft_scaling(tiny_bert, tiny_bert_ft, tmp_path):
    energy = 0.9
    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", energy=energy, svd="exact", bias="lora")
    truth = true_deltas(tiny_bert, tiny_bert_ft)
    ranks = {}
    for m in res.modules:
        t = truth[m.module + ".weight"]
        assert m.energy_kept >= energy and 1 - tail_bound(t, m.rank) ** 2 >= energy - 1e-6, m.module
        if m.rank > 1:  # the smallest such rank: one less falls short
            assert 1 - tail_bound(t, m.rank - 1) ** 2 < energy, m.module
        ranks[m.module] = m.rank
    assert len(set(ranks.values())) > 1  # rank_pattern is really exercised
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]
    layers = lora_layers(peft_model(tiny_bert, tmp_path / "ad", causal=False))
    assert set(layers) == set(ranks)
    for module, r in ranks.items():
        assert layers[module].r["default"] == r, module
        assert layers[module].scaling["default"] == 1.0, module
        assert layers[module].lora_A["default"].weight.shape[0] == r
    # Negative control: a higher threshold needs more rank somewhere.
    res99 = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad99", energy=0.99, svd="exact", bias="lora")
    assert sum(m.rank for m in res99.modules) > sum(ranks.values())


def test_budget_policy(tiny_bert, tiny_bert_ft, tmp_path):
    budget = 3000
    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", budget=str(budget), svd="exact",
                       embeddings="skip", bias="skip")
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    used = sum(v.numel() for k, v in sd.items() if ".lora_" in k)
    assert used == res.adapter_params <= budget
    # Greedy: every module still has σ > 0 left, so the leftover is below the cheapest step (32 + 32).
    assert budget - used < 64
    assert len({m.rank for m in res.modules}) > 1
    layers = lora_layers(peft_model(tiny_bert, tmp_path / "ad", causal=False))
    for m in res.modules:
        assert layers[m.module].r["default"] == m.rank and layers[m.module].scaling["default"] == 1.0
    # Negative control: a larger budget spends more.
    res2 = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad2", budget="6000", svd="exact",
                        embeddings="skip", bias="skip")
    assert 3000 < res2.adapter_params <= 6000 and res2.overall_rel_error < res.overall_rel_error


@pytest.mark.parametrize("model", ["bert", "gpt2", "bert-one-unchanged"])
def test_rank_budget(request, model, tmp_path):
    """--budget r2: exactly the LoRA parameters of a uniform rank-2 extraction, spread by the allocator
    (per-module ranks differ), and a lower error than the uniform rank for the same parameters. An
    unchanged module costs nothing (the uniform extraction skips it too)."""
    arch = model.split("-")[0]
    base, ft = request.getfixturevalue(f"tiny_{arch}"), request.getfixturevalue(f"tiny_{arch}_ft")
    if model.endswith("unchanged"):
        tensors, wb = load_dir(ft), load_dir(base)
        for part in ("weight", "bias"):
            tensors[f"encoder.layer.1.attention.self.value.{part}"] = wb[f"encoder.layer.1.attention.self.value.{part}"]
        ft = write_model(tmp_path / "ft", tensors, ft)
    uni = extract_lora(base, ft, tmp_path / "uni", rank=2, svd="exact")
    bud = extract_lora(base, ft, tmp_path / "bud", budget="r2", svd="exact")
    assert bud.adapter_params <= uni.adapter_params
    assert uni.adapter_params - bud.adapter_params < min(sum(m.shape) for m in uni.modules)  # all but a scrap spent
    assert len({m.rank for m in bud.modules}) > 1  # negative control: not the uniform rank again
    assert bud.overall_rel_error < uni.overall_rel_error
    cfg = json.loads((tmp_path / "bud" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and {cfg["rank_pattern"].get(m.module, cfg["r"]) for m in bud.modules} == {
        m.rank for m in bud.modules}


@pytest.mark.parametrize("text, match", [("r0", "rank >= 1"), ("r2.5", "not a rank budget"), ("rank8", "not a rank")])
def test_rank_budget_refused(tiny_bert, tiny_bert_ft, tmp_path, text, match):
    with pytest.raises(OptionError, match=f"^budget: .*{match}"):
        extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", budget=text)
    assert not (tmp_path / "ad").exists()


def test_unchanged_module_gets_no_lora(tiny_bert, tiny_bert_ft, tmp_path):
    module = "encoder.layer.1.attention.self.value"
    tensors, base = load_dir(tiny_bert_ft), load_dir(tiny_bert)
    for p in ("weight", "bias"):
        tensors[f"{module}.{p}"] = base[f"{module}.{p}"]
    ft = write_model(tmp_path / "ft", tensors, tiny_bert_ft)
    res = extract_lora(tiny_bert, ft, tmp_path / "ad", rank=4)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert module not in cfg["target_modules"] and module not in {m.module for m in res.modules}
    assert {"tensor": f"{module}.weight", "why": "delta is zero"} in res.skipped
    assert not any(k.startswith(f"base_model.model.{module}.")
                   for k in load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    layers = lora_layers(peft_model(tiny_bert, tmp_path / "ad", causal=False))
    assert module not in layers and len(layers) == len(cfg["target_modules"])
    # Negative control: with its delta the module is extracted.
    res2 = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad2", rank=4)
    assert module in {m.module for m in res2.modules}


def test_identical_models_raise(tiny_bert, tmp_path):
    with pytest.raises(SurgeryError, match="no weight differences"):
        extract_lora(tiny_bert, tiny_bert, tmp_path / "ad", rank=4)
    assert not (tmp_path / "ad").exists()


# ----------------------------------------------------------------------------- errors


def _edited_ft(src: Path, out: Path, fn) -> Path:
    tensors = load_dir(src)
    fn(tensors)
    return write_model(out, tensors, src)


def _nan(t):
    w = t["encoder.layer.0.attention.self.query.weight"].clone()
    w[0, 0] = float("nan")
    t["encoder.layer.0.attention.self.query.weight"] = w


ERROR_CASES = {
    # case: (ft edit or None, kwargs, cli args, exception, message needle)
    "missing-key": (lambda t: t.pop("pooler.dense.bias"), {}, [], CheckpointError, "different tensors"),
    "shape": (lambda t: t.update({"encoder.layer.0.intermediate.dense.weight":
                                  t["encoder.layer.0.intermediate.dense.weight"][:60]}),
              {}, [], CheckpointError, "encoder.layer.0.intermediate.dense.weight: shape"),
    "include-nothing": (None, {"include": ["no_such_module"]}, ["--include", "no_such_module"],
                        OptionError, "matches no module"),
    "nan": (_nan, {}, [], CheckpointError, "encoder.layer.0.attention.self.query.weight: non-finite"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_library_and_cli(tiny_bert, tiny_bert_ft, tmp_path, case):
    edit, kwargs, args, exc, needle = ERROR_CASES[case]
    ft = _edited_ft(tiny_bert_ft, tmp_path / "ft", edit) if edit else tiny_bert_ft
    kwargs = {"rank": 4, **kwargs} if "energy" not in kwargs else kwargs
    with pytest.raises(exc, match=re.escape(needle)):
        extract_lora(tiny_bert, ft, tmp_path / "ad", **kwargs)
    assert not (tmp_path / "ad").exists()
    r = run_cli(["extract-lora", tiny_bert, ft, "-o", tmp_path / "ad", *(args or ["--rank", "4"]), "-q"])
    assert r.exit_code == 1, r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], r.stderr
    assert "Traceback" not in r.output and not (tmp_path / "ad").exists()


def test_invalid_regex(tiny_bert, tiny_bert_ft, tmp_path):
    with pytest.raises(OptionError, match="exclude: '\\(' is not a valid regular expression") as e:
        extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", rank=4, exclude=["("])
    assert e.value.field == "exclude"
    for opt in ("--include", "--exclude"):
        r = run_cli(["extract-lora", tiny_bert, tiny_bert_ft, "-o", tmp_path / "ad", opt, "(", "-q"])
        assert r.exit_code == 2 and "not a valid regular expression" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "--rank"), (["--energy", "1.5"], "--energy"), (["--svd", "qr"], "--svd"),
    (["--embeddings", "tied"], "--embeddings"), (["--serving-safe", "--embeddings", "full"], "--serving-safe"),
    (["--rank", "4", "--energy", "0.9"], "--energy: cannot be combined with rank"),  # a conflict: usage error
])
def test_cli_bad_options_exit_2(tiny_bert, tiny_bert_ft, tmp_path, args, needle):
    r = run_cli(["extract-lora", tiny_bert, tiny_bert_ft, "-o", tmp_path / "ad", *args])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "ad").exists()


def test_output_exists_and_overwrite(tiny_bert, tiny_bert_ft, tmp_path):
    out = tmp_path / "ad"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="exists"):
        extract_lora(tiny_bert, tiny_bert_ft, out, rank=4)
    r = run_cli(["extract-lora", tiny_bert, tiny_bert_ft, "-o", out, "--rank", "4", "-q"])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert (out / "old.txt").read_text() == "old"  # untouched
    res = extract_lora(tiny_bert, tiny_bert_ft, out, rank=4, overwrite=True, bias="lora")
    assert not (out / "old.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert len(res.modules) == 13


def test_nan_in_grown_embedding(tiny_bert, tiny_bert_ft, tmp_path):
    tensors = load_dir(tiny_bert_ft)
    w = _grow(tensors["embeddings.word_embeddings.weight"], 5, seed=0)
    w[-1, 3] = float("inf")
    tensors["embeddings.word_embeddings.weight"] = w
    ft = write_model(tmp_path / "ft", tensors, tiny_bert_ft, vocab_size=105)
    with pytest.raises(CheckpointError, match=r"embeddings\.word_embeddings\.weight: non-finite"):
        extract_lora(tiny_bert, ft, tmp_path / "ad", rank=4)
    assert not (tmp_path / "ad").exists()


def test_output_containing_inputs_is_refused(tiny_bert, tiny_bert_ft, tmp_path):
    root = tmp_path / "work"
    base, ft = root / "base", root / "ft"
    shutil.copytree(tiny_bert, base)
    shutil.copytree(tiny_bert_ft, ft)
    try:
        extract_lora(base, ft, root, rank=4, overwrite=True)
    except OutputError:
        pass
    assert base.is_dir() and ft.is_dir(), "the inputs were deleted"


def test_adapter_given_as_base(tiny_bert_lora, tiny_bert_ft, tmp_path):
    with pytest.raises(CheckpointError, match="adapter directory"):
        extract_lora(tiny_bert_lora, tiny_bert_ft, tmp_path / "ad", rank=4)
    r = run_cli(["extract-lora", tiny_bert_lora, tiny_bert_ft, "-o", tmp_path / "ad", "-q"])
    assert r.exit_code == 1 and "adapter directory" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "ad").exists()


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_deterministic_bytes(tiny_bert, tiny_bert_ft, tmp_path, svd):
    kw = dict(rank=3, svd=svd, bias="skip", seed=5)
    runs = [tree_digest(extract_lora(tiny_bert, tiny_bert_ft, tmp_path / f"ad{i}", **kw).out) for i in range(2)]
    assert runs[0] == runs[1] and set(runs[0]) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    if svd == "randomized":  # negative control: another seed draws another sketch
        other = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad-seed", **{**kw, "seed": 6})
        assert tree_digest(other.out)["adapter_model.safetensors"] != runs[0]["adapter_model.safetensors"]


# ----------------------------------------------------------------------------- property


@settings(max_examples=6, deadline=None)
@given(m=st.integers(2, 7), n=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_property_error_monotone_and_full_rank_exact(m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen)  # (m, n)
    d = torch.randn(m, n, generator=gen)  # (m, n), full rank almost surely
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, t in (("base", w), ("ft", w + d)):
            (tmp / name).mkdir()
            save_file({"layer.weight": t}, tmp / name / "model.safetensors", metadata={"format": "pt"})
        errs = []
        for r in range(1, min(m, n) + 1):
            res = extract_lora(tmp / "base", tmp / "ft", tmp / f"ad{r}", rank=r, svd="exact")
            (rep,) = res.modules
            assert rep.rank == r
            errs.append(rep.rel_error)
            assert math.isclose(rep.rel_error, tail_bound(w + d - w, r), rel_tol=1e-3, abs_tol=1e-5)
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-5
    if len(errs) > 1:
        assert errs[0] > 1e-3  # a random full-rank delta is not rank 1


# ----------------------------------------------------------------------------- real checkpoint


def test_minilm_rank8(minilm_dir, minilm_ft, tmp_path):
    """The real all-MiniLM-L6-v2 and its session-scoped fine-tuned twin (built once, shared)."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    res = extract_lora(minilm_dir, minilm_ft, tmp_path / "ad", rank=8, bias="lora")
    assert len(res.modules) >= 36 and all(m.rank == 8 for m in res.modules)
    assert res.overall_rel_error < 0.1  # rank-4 designed delta + 2 % noise
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(["a small model on a fast road", "the cat and the dog see the moon"], padding=True,
                return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            h = model(**batch).last_hidden_state  # (b, t, 384)
        mask = batch["attention_mask"][..., None].float()  # (b, t, 1)
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)  # (b, 384)

    e_ft = embed(AutoModel.from_pretrained(minilm_ft).eval())
    e_base = embed(AutoModel.from_pretrained(minilm_dir).eval())
    pm = PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_dir).eval(), tmp_path / "ad").eval()
    assert len(lora_layers(pm)) == len(res.modules)
    e_ad = embed(pm)
    gap_base = float(1 - (e_base * e_ft).sum(-1).min())
    gap_ad = float(1 - (e_ad * e_ft).sum(-1).min())
    print(f"minilm rank 8: 1-cos base {gap_base:.3e}, adapted {gap_ad:.3e}, rel err {res.overall_rel_error:.4f}")
    assert gap_ad < 0.1 * gap_base, (gap_ad, gap_base)


# ----------------------------------------------------------------------------- CLI and inputs


def test_cli_json_report_summary_and_inputs_unchanged(tiny_llama, tiny_llama_ft, tmp_path):
    before = (tree_digest(tiny_llama), tree_digest(tiny_llama_ft))
    r = run_cli(["extract-lora", tiny_llama, tiny_llama_ft, "-o", tmp_path / "ad", "--rank", "4",
                 "--report", tmp_path / "r.json", "--json", "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data == json.loads((tmp_path / "r.json").read_text())
    assert data["out"] == str(tmp_path / "ad") and len(data["modules"]) == 16
    assert all(m["rank"] == 4 for m in data["modules"] if min(m["shape"]) >= 4)
    assert (tree_digest(tiny_llama), tree_digest(tiny_llama_ft)) == before  # inputs never modified

    r = run_cli(["extract-lora", tiny_llama, tiny_llama_ft, "-o", tmp_path / "ad2", "--rank", "4", "-q"])
    assert r.exit_code == 0, r.output
    assert re.search(r"^wrote .*ad2: 16 LoRA modules, overall relative error \d\.\d{4}$", r.stdout, re.M), r.stdout
    assert "rel. error" in r.stderr and "adapter params" in r.stderr  # the table goes to stderr
    assert (tree_digest(tiny_llama), tree_digest(tiny_llama_ft)) == before


@pytest.mark.parametrize("bad", ["abc", "-5", "0%", "101%"])
def test_cli_bad_budget_is_usage_error(tiny_bert, tiny_bert_ft, tmp_path, bad):
    from click.testing import CliRunner

    from surgery.cli.main import cli

    r = CliRunner().invoke(cli, ["extract-lora", str(tiny_bert), str(tiny_bert_ft), "-o", str(tmp_path / "o"),
                                 "--budget", bad])
    assert r.exit_code == 2 and "budget" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- PEFT interop


@pytest.mark.parametrize("config,task", [
    ({"architectures": ["GPT2LMHeadModel"]}, "CAUSAL_LM"), ({"architectures": ["LlamaForCausalLM"]}, "CAUSAL_LM"),
    ({"architectures": ["BertForSequenceClassification"]}, "SEQ_CLS"),
    ({"architectures": ["BertForTokenClassification"]}, "TOKEN_CLS"),
    ({"architectures": ["BertForQuestionAnswering"]}, "QUESTION_ANS"),
    ({"architectures": ["T5ForConditionalGeneration"]}, "SEQ_2_SEQ_LM"),
    ({"architectures": ["BertModel"]}, "FEATURE_EXTRACTION"),
    ({"architectures": ["ViTForImageClassification"]}, None), ({"architectures": ["NoSuchModel"]}, None), ({}, None),
])
def test_infer_task_type(config, task):
    from surgery.ops.extract import infer_task_type

    assert infer_task_type(config) == task


def test_task_type_and_absolute_base_path_let_auto_peft_load(tiny_llama, tiny_llama_ft, tmp_path, monkeypatch):
    import peft

    root = Path(tiny_llama).parent.parent
    monkeypatch.chdir(root)  # the inputs given relative to the working directory
    res = extract_lora("fixtures/tiny-llama", "fixtures/tiny-llama-ft", tmp_path / "ad", rank=FULL, svd="exact")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert res.task_type == cfg["task_type"] == "CAUSAL_LM"
    assert Path(cfg["base_model_name_or_path"]).is_absolute()
    assert Path(cfg["base_model_name_or_path"]) == Path(tiny_llama).resolve()
    monkeypatch.chdir(tmp_path)  # AutoPeftModel finds the base from anywhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        am = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ad"), dtype=torch.float32).eval()
    y_ft = outputs(hf_model(tiny_llama_ft, causal=True, fp32=True))
    assert max_diff(outputs(am), y_ft) <= BF16_TOL
    # The option overrides the inference.
    extract_lora(tiny_llama, tiny_llama_ft, tmp_path / "fe", rank=2, task_type="FEATURE_EXTRACTION")
    assert json.loads((tmp_path / "fe" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"


def test_default_bias_keeps_embeddings_lora_and_writes_biases_all(tiny_bert, tiny_bert_ft, tmp_path):
    """bias='auto': beside an embedding LoRA the bias deltas go with PEFT's bias='all' (small), the
    embeddings stay LoRAs; PEFT reproduces the fine-tune unmerged and merged."""
    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", rank=FULL, svd="exact")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["bias"] == "all" and cfg["lora_bias"] is False
    assert {"embedding", "linear"} == {m.kind for m in res.modules}
    assert not any("embeddings" in n and "LayerNorm" not in n for n in res.full)
    truth = true_deltas(tiny_bert, tiny_bert_ft)
    assert res.bias_params == sum(t.numel() for k, t in truth.items() if k.endswith(".bias") and "LayerNorm" not in k
                                  and t.any())
    assert res.left_out_share == 0.0 and not res.skipped
    y_ft = outputs(hf_model(tiny_bert_ft, causal=False))
    pm = peft_model(tiny_bert, tmp_path / "ad", causal=False)
    assert max_diff(outputs(pm), y_ft) <= FP32_TOL
    assert max_diff(outputs(pm.merge_and_unload()), y_ft) <= FP32_TOL
    # The old default saved the embeddings whole: at a working rank, a larger adapter.
    new = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "new", rank=4)
    old = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "old", rank=4, bias="lora")
    assert "embeddings.word_embeddings.weight" in old.full and "embeddings.word_embeddings.weight" not in new.full
    size = (tmp_path / "new" / "adapter_model.safetensors").stat().st_size
    assert size < 0.8 * (tmp_path / "old" / "adapter_model.safetensors").stat().st_size


def test_skipped_deltas_report_their_share(tiny_bert, tiny_bert_ft, tmp_path):
    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", rank=FULL, svd="exact", bias="skip")
    truth = true_deltas(tiny_bert, tiny_bert_ft)
    total = sum(float(t.double().pow(2).sum()) for t in truth.values())
    biases = {k for k, t in truth.items() if k.endswith(".bias") and "LayerNorm" not in k and t.any()}
    assert {s["tensor"] for s in res.skipped} == biases
    want = sum(float(truth[k].double().pow(2).sum()) for k in biases) / total
    assert math.isclose(res.left_out_share, want, rel_tol=1e-4) and 0 < want < 1
    assert math.isclose(sum(s["share"] for s in res.skipped), res.left_out_share, rel_tol=1e-9)
    # Negative control: the dropped biases are visible in the outputs.
    assert max_diff(outputs(peft_model(tiny_bert, tmp_path / "ad", causal=False)),
                    outputs(hf_model(tiny_bert_ft, causal=False))) > FP32_TOL


def test_changes_all_left_out_is_not_no_differences(tiny_bert, tmp_path):
    ft = _edited_ft(tiny_bert, tmp_path / "ft", lambda t: t.update(
        {"pooler.dense.bias": t["pooler.dense.bias"] + 0.1}))
    with pytest.raises(SurgeryError, match=r"every change .* is left out \(1 tensors; pooler.dense.bias: bias='skip'"):
        extract_lora(tiny_bert, ft, tmp_path / "ad", rank=2, bias="skip")
    # A bias-only change is extracted (a zero rank-1 LoRA carries lora_B.bias), never "no differences".
    res = extract_lora(tiny_bert, ft, tmp_path / "ok", rank=2)
    sd = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    assert torch.allclose(sd["base_model.model.pooler.dense.lora_B.bias"], torch.full((32,), 0.1), atol=1e-6)
    assert not sd["base_model.model.pooler.dense.lora_A.weight"].any()
    assert any("only its bias changed" in n for n in res.notes)


def test_norm_module_saved_with_every_tensor_and_head_as_linear(tmp_path):
    """modules_to_save holds a norm's weight AND unchanged bias; GPT-NeoX's embed_out is a Linear."""
    from fixtures.zoo import build_model

    base = build_model("gpt2", tmp_path / "b")
    t = load_dir(base)
    t["transformer.h.0.ln_1.weight"] = t["transformer.h.0.ln_1.weight"] + 0.05
    ft = write_model(tmp_path / "f", t, base)
    extract_lora(base, ft, tmp_path / "ad", rank=2)
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert torch.equal(sd["base_model.model.transformer.h.0.ln_1.bias"], t["transformer.h.0.ln_1.bias"])
    assert torch.equal(sd["base_model.model.transformer.h.0.ln_1.weight"], t["transformer.h.0.ln_1.weight"])
    assert "base_model.model.transformer.h.1.ln_1.weight" not in sd  # unchanged modules stay out

    neox = build_model("gpt-neox", tmp_path / "nb")
    t = load_dir(neox)
    gen = torch.Generator().manual_seed(0)
    t["embed_out.weight"] = t["embed_out.weight"] + 0.05 * torch.randn(96, 2, generator=gen) @ torch.randn(
        2, 32, generator=gen)
    ft = write_model(tmp_path / "nf", t, neox)
    res = extract_lora(neox, ft, tmp_path / "nad", rank=2)
    sd = load_file(tmp_path / "nad" / "adapter_model.safetensors")
    assert {"base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"} == set(sd)
    assert [(m.module, m.kind) for m in res.modules] == [("lm_head", "linear")]


def _without(src: Path, out: Path, drop: set[str]) -> Path:
    """A copy of a model directory whose model.safetensors lacks the tensors in `drop`."""
    shutil.copytree(src, out)
    tensors = {k: v for k, v in load_file(out / "model.safetensors").items() if k not in drop}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_minilm_ft_without_position_ids_buffer(minilm_dir, minilm_ft, tmp_path):
    """A sentence-transformers fine-tune saved by newer transformers drops the int position_ids
    buffer: not a weight, noted, extraction goes on. A missing weight still stops it."""
    ft = _without(minilm_ft, tmp_path / "ft", {"embeddings.position_ids"})
    res = extract_lora(minilm_dir, ft, tmp_path / "ad", rank=4)
    assert any(n.startswith("embeddings.position_ids: only in BASE") and "buffer" in n for n in res.notes)
    assert len(res.modules) >= 36
    bad = _without(minilm_ft, tmp_path / "bad", {"embeddings.position_ids", "pooler.dense.bias"})
    with pytest.raises(CheckpointError, match=r"different tensors \(missing from FT: \['pooler.dense.bias'\]"):
        extract_lora(minilm_dir, bad, tmp_path / "ad2", rank=4)


def test_minilm_default_adapter_is_small(minilm_dir, minilm_ft, tmp_path):
    """The default (rank 16, bias='auto') keeps the word embeddings a LoRA: the adapter is a few %
    of the model, not the 55 % that saving them whole (bias='lora') costs — which warns."""
    res = extract_lora(minilm_dir, minilm_ft, tmp_path / "ad")
    model = (Path(minilm_dir) / "model.safetensors").stat().st_size
    size = (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size
    assert size < 0.10 * model and not res.warnings, (size / model, res.warnings)
    old = extract_lora(minilm_dir, minilm_ft, tmp_path / "old", bias="lora")
    assert (tmp_path / "old" / "adapter_model.safetensors").stat().st_size > 0.4 * model
    assert old.warnings and "largest: embeddings.word_embeddings.weight (whole) 5" in old.warnings[0]


def test_pack_experts_matches_peft_param_wrapper_layout():
    """PEFT's ParamWrapper reads A (r·E, in) as (E, r, in) and B (out, r·E) as (out, r, E)."""
    from surgery.ops.extract import pack_experts

    gen = torch.Generator().manual_seed(0)
    E, r, n_out, n_in = 3, 2, 5, 4
    factors = [(torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)) for _ in range(E)]
    A, B = pack_experts(factors, rank=r + 1)  # one zero-padded rank too
    wA, wB = A.reshape(E, -1, n_in), B.reshape(n_out, -1, E)
    delta = torch.einsum("o r e, e r i -> e o i", wB, wA)  # PEFT, (experts, out, in) parameters
    for e, (a, b) in enumerate(factors):
        torch.testing.assert_close(delta[e], b @ a)
    # Negative control: B laid out expert-major (the natural reshape) is not PEFT's layout.
    wrong = torch.cat([torch.nn.functional.pad(b, (0, 1)) for _, b in factors], 1).reshape(n_out, -1, E)
    assert not torch.allclose(torch.einsum("o r e, e r i -> e o i", wrong, wA), delta)


def test_mixtral_experts_under_budget_and_energy(tmp_path):
    """Fused MoE experts (target_parameters) under the budget and energy policies: one rank per
    expert stack, PEFT loads without a warning and reproduces the rank-2-per-expert fine-tune."""
    from peft import PeftModel

    from fixtures.zoo import make_model

    base_m = make_model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_m.save_pretrained(tmp_path / "b")
    ft_m = make_model("mixtral")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ft_m.named_parameters():
            if "experts" in name:  # (E, d1, d2): a rank-2 delta on every expert
                p += 0.05 * torch.einsum("eir,erj->eij", torch.randn(p.shape[0], p.shape[1], 2, generator=gen),
                                         torch.randn(p.shape[0], 2, p.shape[2], generator=gen)) / p.shape[2] ** 0.5
        ids = torch.randint(3, 90, (2, 9), generator=gen)
        want = ft_m(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ft_m.save_pretrained(tmp_path / "f")
    for kw in ({"energy": 0.999}, {"budget": "6000"}):
        res = extract_lora(tmp_path / "b", tmp_path / "f", tmp_path / "ad", overwrite=True, **kw)
        assert {m.kind for m in res.modules} == {"experts"} and all(m.rank >= 2 for m in res.modules), kw
        if "budget" in kw:
            assert res.adapter_params <= 6000
        cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
        assert cfg["target_modules"] == [] and len(cfg["target_parameters"]) == 4
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = PeftModel.from_pretrained(make_model("mixtral"), str(tmp_path / "ad")).eval()
        assert not [w for w in caught if "peft" in (w.filename or "")], kw
        with torch.no_grad():
            got = pm(input_ids=ids).logits
        assert float((got - want).abs().max() / want.abs().max()) < 1e-4, kw
    # Negative control: rank 1 cannot hold a rank-2 expert delta.
    extract_lora(tmp_path / "b", tmp_path / "f", tmp_path / "r1", rank=1)
    with torch.no_grad():
        got = PeftModel.from_pretrained(make_model("mixtral"), str(tmp_path / "r1")).eval()(input_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) > 1e-3
