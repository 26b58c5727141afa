"""extract-lora matrix: every adapter we write loads in PEFT as written and reproduces the fine-tune.

For tiny random models of many architectures (fixtures/zoo.py), a fine-tuned twin is made by
changing one kind of tensor (linears by a rank-2 delta, biases, norm weights only, the input
embedding, a tied embedding, a grown vocabulary, a classifier head, MoE experts). extract-lora
runs with its defaults at rank 4 (the linear deltas are within the rank). Then:

- plain `PeftModel.from_pretrained(base, adapter)` loads with no PEFT warning and no missing or
  unexpected adapter key, and its unmerged forward reproduces the fine-tune (<= 1e-4 relative to
  the outputs' scale);
- PEFT's `merge_and_unload()` reproduces it too;
- `AutoPeftModel...from_pretrained(adapter)` (task_type + base_model_name_or_path) loads it.

A case PEFT cannot represent must be refused by extract-lora with a one-line reason, or written
without the part PEFT cannot hold *and* the report says so (then the reproduction is checked on
the outputs that part does not affect only if the case says so).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fixtures.zoo import make_model
from surgery.errors import SurgeryError

LINEAR_2D = ("q_proj", "v_proj", "k_proj", "o_proj", "qkv_proj", "c_attn", "c_proj", "query_key_value", "dense",
             "query", "value", "key", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "c_fc", "gate_up_proj",
             "dense_h_to_4h", "dense_4h_to_h")


@dataclass
class XCase:
    id: str
    arch: str
    change: str  # linears | biases | norms | embed | tied-embed | embed-rows | vocab | classifier | experts
    expect: str = "reproduce"  # reproduce | refuse
    embeddings: str = "lora"  # extract-lora's embeddings option


def _xcases() -> list[XCase]:
    cs = []
    for a in ["llama", "llama-tied", "qwen2", "mistral", "phi3", "gemma2", "gemma3", "gpt2", "gpt-neox", "opt",
              "bert-cls", "vit", "mixtral"]:
        cs.append(XCase(f"{a}-linears", a, "linears"))
    for a in ["qwen2", "gpt2", "gpt-neox", "opt", "bert-cls"]:
        cs.append(XCase(f"{a}-biases", a, "biases"))
    for a in ["llama", "gpt2", "gpt-neox", "opt", "bert-cls"]:
        cs.append(XCase(f"{a}-norms", a, "norms"))
    for a in ["llama", "qwen2", "gpt-neox", "bert-cls"]:
        cs.append(XCase(f"{a}-embed", a, "embed"))
    for a in ["llama-tied", "gpt2", "gemma3"]:
        cs.append(XCase(f"{a}-tied-embed", a, "tied-embed"))
    for a in ["llama", "llama-tied", "qwen2", "gemma3", "gpt2", "gpt-neox", "opt", "bert-cls"]:
        cs.append(XCase(f"{a}-embed-rows", a, "embed-rows", embeddings="rows"))  # PEFT trainable tokens
    for a in ["llama", "gpt2", "gpt-neox"]:
        cs.append(XCase(f"{a}-vocab", a, "vocab"))
    for a in ["llama", "gpt-neox", "bert-cls", "vit"]:
        cs.append(XCase(f"{a}-head", a, "head"))
    cs.append(XCase("mixtral-experts", "mixtral", "experts"))
    return cs


XCASES = _xcases()
ROWS = (5, 7, 11, 30, 64)  # the rows "embed-rows" changes (inside _inputs' id range)


def _lowrank(shape: tuple[int, ...], g: torch.Generator, scale: float) -> torch.Tensor:
    m, n = shape[0], int(torch.tensor(shape[1:]).prod())
    d = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)
    return (d * scale / d.norm() * (m * n) ** 0.5 / 8).reshape(shape)


def _fine_tune(model: torch.nn.Module, change: str, seed: int = 1) -> torch.nn.Module:
    """Change one kind of tensor of `model` in place (the fine-tune of the case)."""
    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with torch.no_grad():
        if change == "vocab":
            model.resize_token_embeddings(emb.weight.shape[0] + 8)
            emb = model.get_input_embeddings()
            emb.weight[-8:] = torch.randn(8, emb.weight.shape[1], generator=g) * 0.05
            oe = model.get_output_embeddings()
            if oe is not None and oe.weight is not emb.weight:
                oe.weight[-8:] = torch.randn(8, oe.weight.shape[1], generator=g) * 0.05
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 2)
            mod = leaf[-2] if len(leaf) > 1 else ""
            is_emb = getattr(emb, "weight", None) is p
            is_head = out_emb is not None and p is out_emb.weight
            if change == "linears" and p.ndim == 2 and mod in LINEAR_2D and not is_emb and not is_head:
                p += _lowrank(tuple(p.shape), g, 0.05 * p.norm().item() / p.numel() ** 0.5 * 8)
            elif change == "biases" and name.endswith(".bias") and "norm" not in name and "ln" not in mod:
                p += torch.randn(p.shape, generator=g) * 0.02
            elif change == "norms" and p.ndim == 1 and name.endswith(".weight"):
                p += torch.randn(p.shape, generator=g) * 0.02
            elif change in ("embed", "tied-embed") and is_emb:
                p += _lowrank(tuple(p.shape), g, 0.05)
            elif change == "embed-rows" and is_emb:  # a few tokens' rows, as a fine-tune on new text moves them
                p[list(ROWS)] += torch.randn(len(ROWS), p.shape[1], generator=g) * 0.05
            elif change == "head" and (is_head or "classifier" in name or "score" in name) and not is_emb:
                p += _lowrank(tuple(p.shape), g, 0.05) if p.ndim == 2 else torch.randn(p.shape, generator=g) * 0.02
            elif change == "experts" and "experts" in name and p.ndim >= 2:
                # a rank-2 delta on each expert's matrix: PEFT's expert LoRA is per expert
                p += _lowrank(tuple(p.shape), g, 0.05) if p.ndim == 2 else torch.stack(
                    [_lowrank(tuple(p.shape[1:]), g, 0.05) for _ in range(p.shape[0])])
    return model


def _save_tokenizer(path: Path, size: int) -> None:
    """A word-level tokenizer of `size` tokens: a fine-tune that grows the vocabulary ships the
    tokenizer that grew it (AutoPeftModel resizes the base to the tokenizer in the adapter dir)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(str(path))


def _inputs(arch: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(3, 90, (2, 9), generator=g)}


def _out(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        o = model(**inputs)
    return (o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state).float()


def _save(model: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


def _load(path: Path) -> torch.nn.Module:
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, arch).from_pretrained(str(path), dtype=torch.float32).eval()


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = b.abs().max().item() or 1.0
    err = (a - b).abs().max().item() / scale
    assert err <= 1e-4, f"{what}: relative max difference {err:.3g} to the fine-tune"


@pytest.mark.parametrize("case", XCASES, ids=[c.id for c in XCASES])
def test_extracted_adapter_loads_in_peft_and_reproduces(case: XCase, tmp_path: Path) -> None:
    from peft import PeftModel

    from surgery.ops.extract import extract_lora

    base_model = make_model(case.arch, seed=0)
    base = _save(base_model, tmp_path / "base")
    ft_model = _fine_tune(make_model(case.arch, seed=0), case.change)
    ft = _save(ft_model, tmp_path / "ft")
    vocab = ft_model.get_input_embeddings().weight.shape[0] if case.change == "vocab" else None
    if case.change == "vocab":
        _save_tokenizer(ft, vocab)
    ft_model = _load(ft)
    inputs = _inputs(case.arch, ft_model)
    want = _out(ft_model, inputs)
    out = tmp_path / "adapter"
    try:
        extract_lora(base, ft, out, rank=4, embeddings=case.embeddings)
    except SurgeryError as e:
        assert case.expect == "refuse", f"refused: {e}"
        assert "\n" not in str(e).strip() and not out.exists()
        return
    assert case.expect == "reproduce"
    # plain PeftModel.from_pretrained: no warning (PEFT warns on missing/unexpected/misplaced keys)
    base_model = _load(base)
    if case.change == "vocab":  # whole embeddings of another size: PEFT loads them after a resize, as it documents
        base_model.resize_token_embeddings(vocab)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base_model, str(out)).eval()
    peft_warnings = [str(w.message)[:200] for w in caught if "peft" in (w.filename or "")]
    assert not peft_warnings, peft_warnings
    _close(_out(pm, inputs), want, "PEFT unmerged forward")
    merged = pm.merge_and_unload()
    _close(_out(merged, inputs), want, "PEFT merge_and_unload forward")
    # AutoPeftModel: task_type and base_model_name_or_path must let PEFT find everything itself
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]).resolve() == base.resolve()
    import peft

    auto = {"CAUSAL_LM": peft.AutoPeftModelForCausalLM, "SEQ_CLS": peft.AutoPeftModelForSequenceClassification,
            "FEATURE_EXTRACTION": peft.AutoPeftModelForFeatureExtraction}.get(cfg.get("task_type"), peft.AutoPeftModel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        am = auto.from_pretrained(str(out)).eval()
    _close(_out(am, inputs), want, f"{auto.__name__} forward")
    if case.change == "embed-rows":  # written as PEFT's trainable tokens: exactly the changed rows
        assert sorted(next(iter(cfg["trainable_token_indices"].values()))) == list(ROWS)


def test_extract_matrix_negative_control(tmp_path: Path) -> None:
    """The reproduction check can fail: at rank 1 a rank-2 delta is not reproduced."""
    from peft import PeftModel

    from surgery.ops.extract import extract_lora

    base = _save(make_model("llama", seed=0), tmp_path / "base")
    ft = _save(_fine_tune(make_model("llama", seed=0), "linears"), tmp_path / "ft")
    inputs = _inputs("llama", None)
    want = _out(_load(ft), inputs)
    extract_lora(base, ft, tmp_path / "a", rank=1)
    pm = PeftModel.from_pretrained(_load(base), str(tmp_path / "a")).eval()
    with pytest.raises(AssertionError, match="relative max difference"):
        _close(_out(pm, inputs), want, "rank 1")
