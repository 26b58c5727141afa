"""Embedding deltas as whole rows (PEFT's trainable_token_indices): extract writes them, PEFT loads
them as written, merge matches PEFT's merge_and_unload, refine trains them, and the budget
allocator weighs them against LoRA ranks."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.core.lowrank import RowSpectrum, allocate_budget
from surgery.core.peft_format import write_adapter
from surgery.errors import AdapterError, OptionError
from surgery.ops.extract import extract_lora
from tests.test_extract import IDS, hf_model, load_dir, outputs, peft_model, write_model

warnings.filterwarnings("ignore", module="peft")

WORD = {"bert": "embeddings.word_embeddings", "gpt2": "transformer.wte"}
CHANGED = [5, 9, 17, 40]  # the rows the fine-tune moves (all in IDS)


def _row_sparse_ft(base: Path, ft: Path, out: Path, arch: str, rows=CHANGED, dense: bool = False) -> Path:
    """FT's linear deltas, and an embedding delta on ROWS only (DENSE: a rank-1 delta on every row)."""
    tensors, wb = load_dir(ft), load_dir(base)
    key = next(k for k in wb if k.endswith(WORD[arch].rsplit(".", 1)[-1] + ".weight"))
    w = wb[key].clone()
    g = torch.Generator().manual_seed(7)
    if dense:
        w += 0.05 * torch.randn(w.shape[0], 1, generator=g) @ torch.randn(1, w.shape[1], generator=g)
    else:
        w[rows] += 0.5 * torch.randn(len(rows), w.shape[1], generator=g)
    tensors[key] = w
    return write_model(out, tensors, ft)


def test_row_spectrum_and_allocator():
    d = torch.zeros(6, 4)
    d[1], d[4] = torch.tensor([3.0, 4.0, 0, 0]), torch.tensor([1.0, 0, 0, 0])
    rs = RowSpectrum.of(d)
    assert rs.sq.tolist() == [25.0, 1.0] and (rs.width, rs.rows) == (4, 6)
    lin = (torch.tensor([4.0, 1.0]), 3, 3)  # rank steps cost 6
    # rows keep a uniform rank's share: budget·(6 + 4)/(10 + 6), in whole rows, at most the 2 changed ones
    assert allocate_budget({"emb": rs, "lin": lin}, 16) == {"emb": 2, "lin": 1}  # share 10 -> 2 rows, 8 left
    assert allocate_budget({"emb": rs, "lin": lin}, 32) == {"emb": 2, "lin": 2}  # share 20 -> 5 rows, capped
    assert allocate_budget({"emb": rs, "lin": lin}, 6) == {"emb": 0, "lin": 1}  # share 3 buys no row
    # an unchanged matrix takes no share (as "rN" counts only changed ones)
    assert allocate_budget({"emb": rs, "zero": (torch.zeros(2), 3, 3)}, 8) == {"emb": 2, "zero": 0}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_rows_extract_load_merge(request, arch, tmp_path):
    """--embeddings rows keeps every changed row (rank 2 buys 8 rows, 4 changed): PEFT loads the
    rows as written, its output equals a LoRA-only adapter plus the exact rows, and surgery merge
    equals PEFT's merge_and_unload bit for bit. GPT-2's embedding is tied to its head."""
    from surgery.ops.merge import merge

    base, ft0 = request.getfixturevalue(f"tiny_{arch}"), request.getfixturevalue(f"tiny_{arch}_ft")
    ft = _row_sparse_ft(base, ft0, tmp_path / "ft", arch)
    res = extract_lora(base, ft, tmp_path / "ad", rank=2, embeddings="rows", include=[r"wte|word_emb|layer|\.h\."])
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {WORD[arch]: CHANGED}
    assert WORD[arch] not in cfg["target_modules"]
    emb = next(m for m in res.modules if m.module == WORD[arch])
    assert emb.method == "rows" and emb.rows == 4 and emb.rel_error == 0.0 and emb.params == 4 * 32
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    rows = saved[f"base_model.model.{WORD[arch]}.token_adapter.trainable_tokens_delta"]
    key = next(k for k in load_dir(ft) if k.endswith(WORD[arch].rsplit(".", 1)[-1] + ".weight"))
    assert torch.equal(rows, load_dir(ft)[key][CHANGED])
    # PEFT: its merged embedding is the fine-tune's, and surgery merge matches it exactly
    causal = arch == "gpt2"
    pm = peft_model(base, tmp_path / "ad", causal=causal)
    y_peft = outputs(pm)
    # refine's student (our hooks; GPT-2's tied head sees the rows too) computes what PEFT does
    from surgery.ops.refine import load_student

    assert torch.allclose(outputs(load_student(base, tmp_path / "ad")), y_peft, atol=1e-5)
    merged = pm.merge_and_unload()
    merge(base, [tmp_path / "ad"], tmp_path / "merged")
    ours = hf_model(tmp_path / "merged", causal)
    theirs = dict(merged.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    assert torch.allclose(outputs(ours), y_peft, atol=1e-5)
    ft_emb = hf_model(ft, causal).get_input_embeddings().weight
    assert torch.equal(ours.get_input_embeddings().weight, ft_emb)
    # negative control: the same extraction without the embedding's rows does not reproduce them
    extract_lora(base, ft, tmp_path / "lora", rank=2, embeddings="skip", include=[r"wte|word_emb|layer|\.h\."])
    merge(base, [tmp_path / "lora"], tmp_path / "merged-lora")
    assert not torch.equal(hf_model(tmp_path / "merged-lora", causal).get_input_embeddings().weight, ft_emb)


def test_rows_under_budget(tiny_bert, tiny_bert_ft, tmp_path):
    """--budget r2 --embeddings rows: the embedding keeps rank 2's share as rows (all 4 changed
    ones fit), the allocator spreads the rest, the total stays within uniform rank 2's, and the
    error is lower than the same budget with an embedding LoRA (the negative control)."""
    sparse = _row_sparse_ft(tiny_bert, tiny_bert_ft, tmp_path / "sparse", "bert")
    uni = extract_lora(tiny_bert, sparse, tmp_path / "uni", rank=2, svd="exact", include=[r"word_emb|layer"])
    bud = extract_lora(tiny_bert, sparse, tmp_path / "bud", budget="r2", svd="exact", embeddings="rows",
                       include=[r"word_emb|layer"])
    assert sum(m.params for m in bud.modules) <= sum(m.params for m in uni.modules)  # (bias deltas aside)
    emb = next(m for m in bud.modules if m.module == WORD["bert"])
    assert emb.method == "rows" and emb.rows == 4 and emb.rel_error == 0.0
    cfg = json.loads((tmp_path / "bud" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {WORD["bert"]: CHANGED}
    lora = extract_lora(tiny_bert, sparse, tmp_path / "bud-lora", budget="r2", svd="exact",
                        include=[r"word_emb|layer"])
    assert next(m for m in lora.modules if m.module == WORD["bert"]).method != "rows"
    assert lora.overall_rel_error > bud.overall_rel_error


def test_rows_refused_with_serving_safe(tiny_bert, tiny_bert_ft, tmp_path):
    with pytest.raises(OptionError, match="^serving_safe: .*rows"):
        extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", embeddings="rows", serving_safe=True)
    assert not (tmp_path / "ad").exists()


def test_write_adapter_refuses_tokens_on_a_lora_module(tmp_path):
    from surgery.core.peft_format import LoraModule

    m = LoraModule("emb", "embedding", torch.zeros(1, 10), torch.zeros(4, 1))
    with pytest.raises(AdapterError, match="also a LoRA module"):
        write_adapter(tmp_path / "ad", {"emb": m}, trainable_tokens={"emb": ([1, 2], torch.zeros(2, 4))})
    with pytest.raises(AdapterError, match="distinct"):
        write_adapter(tmp_path / "ad", {"emb": m}, trainable_tokens={"other": ([1, 1], torch.zeros(2, 4))})
    assert not (tmp_path / "ad").exists()


def test_refine_trains_token_rows(tiny_bert, tiny_bert_ft, tmp_path):
    """refine trains the rows beside A/B and writes them back; PEFT loads the refined adapter and
    our student's forward equals PEFT's (the refined rows, not the extracted ones, are used)."""
    from surgery.ops.refine import load_student, refine_adapter

    ft = _row_sparse_ft(tiny_bert, tiny_bert_ft, tmp_path / "ft", "bert")
    extract_lora(tiny_bert, ft, tmp_path / "ad", rank=1, embeddings="rows", include=[r"word_emb|layer"])
    words = ["the", "a", "model", "layer", "weight", "rank", "matrix", "tensor"]  # ids 5/9/17/40: . ' if does
    texts = [f"if the {words[i % 8]} does {words[(3 * i) % 8]} . it ' s {words[(5 * i) % 8]}" for i in range(40)]
    res = refine_adapter(tiny_bert, tmp_path / "ad", tmp_path / "ref", teacher=ft, calibration=texts, steps=20,
                         lr=1e-2, batch_size=8, eval_every=5)
    key = f"base_model.model.{WORD['bert']}.token_adapter.trainable_tokens_delta"
    before, after = (load_file(tmp_path / d / "adapter_model.safetensors")[key] for d in ("ad", "ref"))
    assert res.best_step > 0 and not torch.equal(before, after)  # the rows were trained
    cfg = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == json.loads((tmp_path / "ad" / "adapter_config.json").read_text())[
        "trainable_token_indices"]
    ours = load_student(tiny_bert, tmp_path / "ref")
    with torch.no_grad():
        y_ours = ours(input_ids=IDS).last_hidden_state
    y_peft = outputs(peft_model(tiny_bert, tmp_path / "ref", causal=False))
    assert torch.allclose(y_ours, y_peft, atol=1e-5)
    y_start = outputs(peft_model(tiny_bert, tmp_path / "ad", causal=False))
    assert not torch.allclose(y_start, y_peft, atol=1e-5)  # negative control: the refined adapter differs
