"""extract-lora -> merge round trips on models whose checkpoints transformers saves under legacy
names (ViT ``attention.attention.query``, GPT-NeoX ``embed_out``, Mixtral per-expert ``w1/w2/w3``)
while PEFT keys adapters by the in-memory module names.

For each case: a fine-tune (tests/test_extract_matrix.py's _fine_tune) is extracted at a rank that
holds the delta, `surgery merge` folds the adapter back into the base, and

- transformers loads the merged directory with no missing or unexpected keys, and the merged
  checkpoint keeps the base's on-disk names;
- its outputs reproduce the fine-tune's (<= 1e-4 relative to their scale);
- its parameters equal PEFT's `merge_and_unload` of the same adapter bit for bit.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from fixtures.zoo import make_model
from tests.test_extract_matrix import _close, _fine_tune, _inputs, _load, _out, _save

CASES = [("vit", "linears"), ("vit", "head"), ("gpt-neox", "linears"), ("gpt-neox", "head"),
         ("mixtral", "linears"), ("mixtral", "experts")]


def _loaded(path: Path):
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = getattr(transformers, arch).from_pretrained(str(path), dtype=torch.float32,
                                                                  output_loading_info=True)
    return model.eval(), info


def _keys(path: Path) -> set[str]:
    from safetensors import safe_open

    out: set[str] = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            out |= set(s.keys())
    return out


def _round_trip(tmp: Path, arch: str, change: str) -> tuple[Path, Path, Path, dict, torch.Tensor]:
    from surgery.ops.extract import extract_lora
    from surgery.ops.merge import merge

    base = _save(make_model(arch, seed=0), tmp / "base")
    ft = _save(_fine_tune(make_model(arch, seed=0), change), tmp / "ft")
    inputs = _inputs(arch, None)
    want = _out(_load(ft), inputs)
    extract_lora(base, ft, tmp / "adapter", rank=4)
    merge(base, [tmp / "adapter"], tmp / "merged")
    return base, tmp / "adapter", tmp / "merged", inputs, want


@pytest.mark.parametrize(("arch", "change"), CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_extract_then_merge_reproduces_and_equals_peft(arch: str, change: str, tmp_path: Path) -> None:
    from peft import PeftModel

    base, adapter, merged, inputs, want = _round_trip(tmp_path, arch, change)
    assert _keys(merged) == _keys(base)  # the base's on-disk names, nothing added or lost
    ours, info = _loaded(merged)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _close(_out(ours, inputs), want, "surgery merge forward")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        truth = PeftModel.from_pretrained(_load(base), str(adapter)).merge_and_unload().state_dict()
    mine = ours.state_dict()
    assert set(mine) == set(truth)
    diff = [k for k in truth if not torch.equal(mine[k], truth[k])]
    assert not diff, f"{len(diff)} tensor(s) differ from PEFT's merge_and_unload, e.g. {diff[:3]}"


def test_interop_negative_control(tmp_path: Path) -> None:
    """The reproduction check can fail: the base alone does not reproduce the fine-tune."""
    base, _, _, inputs, want = _round_trip(tmp_path, "vit", "linears")
    with pytest.raises(AssertionError, match="relative max difference"):
        _close(_out(_load(base), inputs), want, "base")


# ----------------------------------------------------------------------------- unmerge round trips

UNMERGE_OK = ["llama-targets", "gpt2-all-linear", "gpt-neox-regex-rslora", "phi3-patterns", "opt-lora-bias",
              "llama-layers", "llama-embed-lora", "llama-tied-embed-lora", "vit-conv", "whisper-conv1d",
              "mixtral-all-linear", "mixtral-target-parameters-both", "llama-weighted", "llama-bf16"]
UNMERGE_REFUSED = ["llama-dora", "llama-mts-head", "gpt2-bias-all", "llama-trainable-tokens", "llama-resized"]


@pytest.mark.parametrize("case_id", UNMERGE_OK + UNMERGE_REFUSED)
def test_unmerge_round_trips_or_refuses(case_id: str, tmp_path: Path) -> None:
    """merge then unmerge returns the base (within PEFT's unmerge precision: one rounding of the
    merged weight, so a few ulps of the weight's dtype), or unmerge is refused with one line."""
    from surgery.errors import SurgeryError
    from surgery.ops.merge import merge
    from tests.test_peft_matrix import CASES, _build

    case = next(c for c in CASES if c.id == case_id)
    base, adapters = _build(case, tmp_path)
    merge(base, adapters, tmp_path / "m", weights=case.weights)
    if case_id in UNMERGE_REFUSED:
        with pytest.raises(SurgeryError) as e:
            merge(tmp_path / "m", adapters, tmp_path / "u", weights=case.weights, unmerge=True)
        assert "\n" not in str(e.value).strip() and not (tmp_path / "u").exists()
        return
    merge(tmp_path / "m", adapters, tmp_path / "u", weights=case.weights, unmerge=True)
    want, got, merged = _keys_tensors(base), _keys_tensors(tmp_path / "u"), _keys_tensors(tmp_path / "m")
    assert set(got) == set(want)
    eps = torch.finfo(case.dtype).eps
    changed = [k for k in want if not torch.equal(merged[k], want[k])]
    assert changed  # negative control: the merge did change the base
    for k in want:
        tol = 4 * eps * max(want[k].float().abs().max().item(), merged[k].float().abs().max().item(), 1.0)
        err = (got[k].float() - want[k].float()).abs().max().item() if want[k].numel() else 0.0
        assert err <= tol, f"{k}: unmerge is {err:.3g} from the base (tolerance {tol:.3g})"


def _keys_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in path.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out
