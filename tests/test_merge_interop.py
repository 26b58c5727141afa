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
