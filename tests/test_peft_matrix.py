"""PEFT configuration matrix: every adapter PEFT makes either merges exactly or is refused.

Adapters are written by PEFT itself (get_peft_model + save_pretrained) on tiny random models of
a dozen architectures built from transformers config classes (fixtures/zoo.py). For each case:

- PEFT is the oracle: a fresh base loaded by transformers, PeftModel.from_pretrained,
  merge_and_unload(); its state_dict is the truth.
- `surgery merge` writes a model directory; transformers must load it with no missing or
  unexpected keys, and every tensor must be bit-identical (torch.equal) to PEFT's.
- A case marked `refuse` must raise a SurgeryError (a one-line reason), never write.

Zero silent differences: a merge that exits normally but differs fails the test.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fixtures.zoo import make_model
from surgery.errors import SurgeryError

warnings.filterwarnings("ignore", module="peft")
warnings.filterwarnings("ignore", module="transformers")

# The linear modules to target per architecture (what users write in target_modules).
TARGETS = {
    "llama": ["q_proj", "v_proj"], "llama-tied": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "phi3": ["qkv_proj", "o_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"], "gpt2": ["c_attn", "c_proj"], "gpt-neox": ["query_key_value", "dense"],
    "opt": ["q_proj", "v_proj"], "bert-cls": ["query", "value"], "bert": ["query", "value"],
    "mixtral": ["q_proj", "v_proj"], "vit": ["query", "value"], "whisper": ["q_proj", "v_proj"],
}
EMBED = {"llama": "embed_tokens", "llama-tied": "embed_tokens", "qwen2": "embed_tokens", "mistral": "embed_tokens",
         "phi3": "embed_tokens", "gemma2": "embed_tokens", "gemma3": "embed_tokens", "gpt2": "wte",
         "gpt-neox": "embed_in", "opt": "embed_tokens", "bert": "word_embeddings", "bert-cls": "word_embeddings"}
HEAD = {"llama": "lm_head", "qwen2": "lm_head", "mistral": "lm_head", "phi3": "lm_head", "gpt-neox": "embed_out",
        "opt": "lm_head", "bert-cls": "classifier"}
CAUSAL = ["llama", "llama-tied", "qwen2", "mistral", "phi3", "gemma2", "gemma3", "gpt2", "gpt-neox", "opt"]


@dataclass
class Case:
    id: str
    arch: str
    lora: dict[str, Any]
    expect: str = "exact"  # "exact" | "refuse"
    resize: int | None = None  # resize_token_embeddings before PEFT (a grown vocabulary)
    dtype: torch.dtype = torch.float32
    extra: list[dict[str, Any]] = field(default_factory=list)  # more adapters (weighted merge)
    weights: list[float] | None = None


def _fifo(arch: str) -> dict[str, Any]:
    return {"fan_in_fan_out": True} if arch == "gpt2" else {}


def _cases() -> list[Case]:
    cs: list[Case] = []
    for a in CAUSAL:
        t, f = TARGETS[a], _fifo(a)
        cs += [
            Case(f"{a}-targets", a, dict(target_modules=t, r=4, lora_alpha=8, **f)),
            Case(f"{a}-all-linear", a, dict(target_modules="all-linear", r=4, lora_alpha=16, **f)),
            Case(f"{a}-regex-rslora", a, dict(target_modules=r".*\.(" + "|".join(t) + r")$", r=4, lora_alpha=8,
                                              use_rslora=True, **f)),
            Case(f"{a}-patterns", a, dict(target_modules=t, r=4, lora_alpha=8, rank_pattern={t[0]: 2},
                                          alpha_pattern={t[-1]: 3}, **f)),
            Case(f"{a}-dora", a, dict(target_modules=t, r=4, lora_alpha=8, use_dora=True, **f)),
        ]
    for a in ["llama", "gpt2", "gpt-neox", "opt", "phi3"]:
        t, f = TARGETS[a], _fifo(a)
        cs += [
            Case(f"{a}-lora-bias", a, dict(target_modules=t, r=4, lora_alpha=8, lora_bias=True, **f)),
            Case(f"{a}-bias-all", a, dict(target_modules=t, r=4, lora_alpha=8, bias="all", **f)),
            Case(f"{a}-bias-lora-only", a, dict(target_modules=t, r=4, lora_alpha=8, bias="lora_only", **f)),
            Case(f"{a}-layers", a, dict(target_modules=t, r=4, lora_alpha=8, layers_to_transform=[1], **f)),
        ]
    for a in ["llama", "llama-tied", "gpt2", "gemma3", "gpt-neox", "qwen2"]:
        f = _fifo(a)
        cs += [
            Case(f"{a}-embed-lora", a, dict(target_modules=[EMBED[a]], r=4, lora_alpha=8)),
            Case(f"{a}-mts-embed", a, dict(target_modules=TARGETS[a], modules_to_save=[EMBED[a]], r=4, lora_alpha=8,
                                           **f)),
        ]
    for a in ["llama-tied", "gpt2", "gemma3"]:
        cs += [Case(f"{a}-embed-lora-tying", a, dict(target_modules=[EMBED[a]], r=4, lora_alpha=8,
                                                     ensure_weight_tying=True))]
    for a in ["llama", "gpt-neox", "qwen2"]:
        cs += [Case(f"{a}-mts-head", a, dict(target_modules=TARGETS[a], modules_to_save=[HEAD[a]], r=4,
                                             lora_alpha=8))]
    cs += [
        Case("llama-embed-dora", "llama", dict(target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8,
                                                use_dora=True)),
        Case("llama-resized", "llama", dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens",
                                            "lm_head"], r=4, lora_alpha=8), resize=104),
        Case("gpt2-resized-save-emb", "gpt2", dict(target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True,
                                                   modules_to_save=["wte"]), resize=104),
        Case("llama-trainable-tokens", "llama", dict(target_modules=["q_proj"], r=4, lora_alpha=8,
                                                      trainable_token_indices=[3, 5, 7])),
        Case("llama-tied-trainable-tokens", "llama-tied", dict(target_modules=["q_proj"], r=4, lora_alpha=8,
                                                                trainable_token_indices=[3, 5, 7])),
        Case("mixtral-targets", "mixtral", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)),
        # PEFT turns all-linear on fused MoE experts into target_parameters (ParamWrapper LoRA on
        # experts.gate_up_proj / down_proj, router gate.weight), with a rank/alpha pattern for gate_up_proj
        Case("mixtral-all-linear", "mixtral", dict(target_modules="all-linear", r=4, lora_alpha=8)),
        Case("mixtral-target-parameters", "mixtral", dict(target_modules=[], r=4, lora_alpha=8,
                                                           target_parameters=["experts.gate_up_proj"])),
        Case("mixtral-target-parameters-both", "mixtral", dict(target_modules=["q_proj"], r=2, lora_alpha=4,
                                                                use_rslora=True,
                                                                target_parameters=["experts.gate_up_proj",
                                                                                   "experts.down_proj"])),
        Case("mixtral-target-parameters-weighted", "mixtral", dict(target_modules=[], r=4, lora_alpha=8,
                                                                    target_parameters=["experts.down_proj"]),
             extra=[dict(target_modules=[], r=2, lora_alpha=2, target_parameters=["experts.down_proj"])],
             weights=[0.7, 0.3]),
        Case("bert-cls-seqcls", "bert-cls", dict(target_modules=["query", "value"], r=4, lora_alpha=8,
                                                  modules_to_save=["classifier"])),
        Case("bert-all-linear", "bert", dict(target_modules="all-linear", r=4, lora_alpha=8)),
        Case("vit-targets", "vit", dict(target_modules=["query", "value"], modules_to_save=["classifier"], r=4,
                                        lora_alpha=8)),
        Case("vit-conv", "vit", dict(target_modules=["projection"], r=2, lora_alpha=4)),
        Case("whisper-targets", "whisper", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)),
        Case("whisper-conv1d", "whisper", dict(target_modules=["conv1", "conv2"], r=2, lora_alpha=4)),
        Case("llama-bf16", "llama", dict(target_modules="all-linear", r=4, lora_alpha=8), dtype=torch.bfloat16),
        Case("llama-weighted", "llama", dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
             extra=[dict(target_modules=["v_proj", "o_proj"], r=2, lora_alpha=2, use_rslora=True)],
             weights=[0.7, 0.3]),
        Case("llama-target-matches-nothing", "llama", dict(target_modules=["q_proj", "not_a_module"], r=4,
                                                           lora_alpha=8)),
        Case("llama-rank-pattern-matches-nothing", "llama", dict(target_modules=["q_proj"], r=4, lora_alpha=8,
                                                                 rank_pattern={"nothing_here": 2})),
    ]
    return cs


CASES = _cases()


# ----------------------------------------------------------------------------- PEFT side


def _perturb(pm: torch.nn.Module, seed: int) -> None:
    """PEFT initialises lora_B (and embedding A) to zero: draw every trainable tensor so merging matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_((p.float() + torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))


def _peft_adapter(model: torch.nn.Module, lora: dict, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    kw = dict(lora)
    pm = get_peft_model(model, LoraConfig(**kw))
    _perturb(pm, seed)
    save_kw = {"save_embedding_layers": True} if kw.get("modules_to_save") is None and False else {}
    pm.save_pretrained(str(out), **save_kw)
    return out


def _load(path: Path, dtype: torch.dtype):
    import json

    import transformers
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, arch).from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    return model.eval(), info


def _peft_merged(base: Path, adapters: list[Path], weights: list[float] | None, dtype: torch.dtype):
    from peft import PeftModel

    model, _ = _load(base, dtype)
    for ad, w in zip(adapters, weights or [1.0] * len(adapters)):
        pm = PeftModel.from_pretrained(model, str(ad))
        for mod in pm.modules():
            if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
                mod.scaling["default"] *= w
        model = pm.merge_and_unload()
    return model


def _build(case: Case, tmp: Path) -> tuple[Path, list[Path]]:
    model = make_model(case.arch, seed=0)
    if case.resize:
        model.resize_token_embeddings(case.resize)
    model = model.to(case.dtype)
    base = tmp / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(base)
    adapters = []
    for i, lora in enumerate([case.lora, *case.extra]):
        m, _ = _load(base, case.dtype)
        adapters.append(_peft_adapter(m, lora, tmp / f"adapter{i}", seed=10 + i))
    return base, adapters


# ----------------------------------------------------------------------------- the matrix


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_merge_matches_peft_or_refuses(case: Case, tmp_path: Path) -> None:
    from surgery.ops.merge import merge

    try:
        base, adapters = _build(case, tmp_path)
    except Exception as e:  # noqa: BLE001 - PEFT cannot make this adapter here: not our case
        pytest.skip(f"PEFT cannot build this adapter: {type(e).__name__}: {str(e)[:120]}")
    try:
        truth = _state(_peft_merged(base, adapters, case.weights, case.dtype))
    except Exception as e:  # noqa: BLE001
        peft_error = f"{type(e).__name__}: {str(e)[:160]}"
        truth = None
    out = tmp_path / "merged"
    try:
        merge(base, adapters, out, weights=case.weights)
    except SurgeryError as e:
        msg = str(e)
        assert "\n" not in msg.strip()
        assert case.expect == "refuse" or truth is None, f"refused a case PEFT merges: {msg}"
        assert not out.exists()
        return
    assert truth is not None, f"PEFT fails on this adapter ({peft_error}) but surgery merged it"
    assert case.expect == "exact", "expected a refusal"
    ours, info = _load(out, case.dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    mine = _state(ours)
    assert set(mine) == set(truth), set(mine) ^ set(truth)
    diff = [k for k in truth if not torch.equal(mine[k], truth[k])]
    assert not diff, f"{len(diff)} tensor(s) differ from PEFT's merge_and_unload, e.g. {diff[:3]}: " + \
        f"max {max((mine[k].double() - truth[k].double()).abs().max().item() for k in diff):.3g}"


def test_matrix_is_large_enough() -> None:
    assert len(CASES) >= 60
    # the architectures issue #11 names (the zoo also holds ONNX-only ones: vision/audio heads)
    assert {c.arch for c in CASES} >= {"llama", "llama-tied", "qwen2", "mistral", "phi3", "gemma2", "gemma3", "gpt2",
                                        "gpt-neox", "opt", "bert-cls", "mixtral", "vit", "whisper"}


def test_negative_control_a_changed_tensor_is_caught(tmp_path: Path) -> None:
    """The comparison can fail: perturb one merged tensor of an exact case -> a difference shows."""
    from surgery.ops.merge import merge

    case = next(c for c in CASES if c.id == "llama-targets")
    base, adapters = _build(case, tmp_path)
    truth = _state(_peft_merged(base, adapters, None, torch.float32))
    merge(base, adapters, tmp_path / "m")
    ours, _ = _load(tmp_path / "m", torch.float32)
    mine = _state(ours)
    k = next(k for k in mine if re.search(r"q_proj\.weight$", k))
    mine[k] = mine[k] + 1e-6
    assert not torch.equal(mine[k], truth[k])
