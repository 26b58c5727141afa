"""refine: bad input (long text, tiny sets, adapters for another base), the relational / multi-layer
hidden / weighted objectives, trainable 1-D deltas and early stopping (tiny fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import calibration_texts as texts
from helpers import one_thread_per_module as one_thread  # noqa: F401 - autouse fixture
from helpers import write_calibration
from surgery.errors import AdapterError, OptionError
from surgery.ops.extract import extract_lora
from surgery.ops.refine import refine_adapter
from surgery.options.refine import RefineOptions

LR = 1e-2


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return write_calibration(tmp_path_factory.mktemp("calib"), 60, seed=1)


@pytest.fixture(scope="module")
def bert_svd(tiny_bert, tiny_bert_ft, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bert") / "svd"
    extract_lora(tiny_bert, tiny_bert_ft, out, rank=2, bias="lora")
    return out


def run(tiny_bert, tiny_bert_ft, svd, out, calib, **kw):
    kw = {"steps": 12, "lr": LR, "batch_size": 8, **kw}
    return refine_adapter(tiny_bert, svd, out, teacher=tiny_bert_ft, calibration=calib, **kw)


# ----------------------------------------------------------------------------- bad input


def test_long_text_is_truncated_to_the_model_positions(tiny_bert, tiny_bert_ft, bert_svd, tmp_path):
    long = [" ".join(["the model layer"] * 60)] * 4 + texts(12, seed=3)  # ~180 tokens; the model has 64
    res = run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "o", long, steps=2, max_length=512)
    assert any("truncated to 64" in n for n in res.notes)
    # negative control: a max_length within the limit leaves no note
    res = run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "o2", long, steps=2, max_length=32)
    assert res.notes == []


@pytest.mark.parametrize("n", [0, 1, 7])
def test_tiny_calibration_is_one_line(tiny_bert, tiny_bert_ft, bert_svd, tmp_path, n):
    p = tmp_path / "c.txt"
    p.write_text("\n".join(texts(n, seed=4)) + "\n")
    with pytest.raises(OptionError) as e:
        run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "o", p)
    assert "\n" not in str(e.value) and e.value.field == "calibration"
    assert not (tmp_path / "o").exists()
    run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "ok", texts(8, seed=4), steps=1)  # 8 is enough


def test_too_few_for_the_holdout(tiny_bert, tiny_bert_ft, bert_svd, tmp_path):
    with pytest.raises(OptionError, match="too few") as e:
        run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "o", texts(8, seed=4), holdout=0.95)
    assert e.value.field == "holdout"


def _edit(src: Path, dst: Path, fn) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    sd = load_file(src / "adapter_model.safetensors")
    cfg, sd = fn(cfg, sd)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(sd, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def test_adapter_for_another_base_is_refused_before_loading(tiny_bert, tiny_bert_ft, bert_svd, calib, tmp_path,
                                                            monkeypatch):
    import surgery.ops.refine as R

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(R, "_load_model", no_load)

    def wider(cfg, sd):  # every factor of one module one column wider: the base layer is narrower
        key = next(k for k in sd if k.endswith("query.lora_A.weight"))
        sd[key] = torch.cat([sd[key], sd[key][:, :1]], 1)
        return cfg, sd

    def renamed(cfg, sd):  # targets a module the base does not have
        sd = {k.replace("attention.self.query", "attention.self.quary"): v for k, v in sd.items()}
        cfg["target_modules"] = [m.replace("query", "quary") for m in cfg["target_modules"]]
        return cfg, sd

    for i, fn in enumerate((wider, renamed)):
        bad = _edit(bert_svd, tmp_path / f"bad{i}", fn)
        with pytest.raises(AdapterError) as e:
            run(tiny_bert, tiny_bert_ft, bad, tmp_path / f"o{i}", calib)
        assert "\n" not in str(e.value) and "another model" in str(e.value)
    # negative control: the unedited adapter passes the check and reaches the (patched) model load
    with pytest.raises(AssertionError, match="a model was loaded"):
        run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "o9", calib)


# ----------------------------------------------------------------------------- objectives


@pytest.fixture(scope="module")
def bert_svd1(tiny_bert, tiny_bert_ft, tmp_path_factory) -> Path:
    """Rank 1 and extract's default bias: a start refine can still improve, carrying 1-D deltas."""
    out = tmp_path_factory.mktemp("bert1") / "svd"
    extract_lora(tiny_bert, tiny_bert_ft, out, rank=1)
    return out


@pytest.mark.parametrize("objective,kw", [
    ("relational", {}),
    ("hidden", {}),
    ("hidden", {"layers": (1, -1)}),
    ("pooled+relational", {"weights": (1.0, 4.0)}),
])
def test_objectives_lower_their_heldout_loss(tiny_bert, tiny_bert_ft, bert_svd1, calib, tmp_path, objective, kw):
    res = run(tiny_bert, tiny_bert_ft, bert_svd1, tmp_path / "o", calib, objective=objective, steps=20, lr=1e-3, **kw)
    assert res.objective == objective
    assert set(res.after.parts) == set(objective.split("+"))
    assert res.after.loss < res.before.loss < res.no_adapter.loss
    if "weights" in kw:  # the loss is the weighted sum of the parts
        p = res.after.parts
        assert res.after.loss == pytest.approx(p["pooled"] + 4.0 * p["relational"], rel=1e-9)


def test_hidden_default_layers_are_middle_and_last(tiny_bert, tiny_bert_ft, bert_svd, calib, tmp_path):
    a = run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "a", calib, objective="hidden", steps=0)
    b = run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "b", calib, objective="hidden", steps=0, layers=(1, 2))
    c = run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "c", calib, objective="hidden", steps=0, layers=(2,))
    assert a.before.loss == b.before.loss != c.before.loss  # tiny-bert has 2 layers: middle 1, last 2
    with pytest.raises(OptionError, match="outside") as e:
        run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "d", calib, objective="hidden", layers=(9,))
    assert e.value.field == "layers"


@pytest.mark.parametrize("fields,field", [
    ({"objective": "pooled+pooled"}, "objective"), ({"objective": "pooled+mse"}, "objective"),
    ({"objective": "auto+pooled"}, "objective"), ({"weights": (1.0, 2.0)}, "weights"),
    ({"objective": "pooled+relational", "weights": (1.0, float("nan"))}, "weights"),
    ({"objective": "pooled+relational", "weights": (0.0, 0.0)}, "weights"), ({"layers": ()}, "layers"),
    ({"layers": (1.5,)}, "layers"), ({"train_vectors": 1}, "train_vectors"), ({"patience": 0}, "patience"),
])
def test_new_option_rules(fields, field):
    with pytest.raises(OptionError) as e:
        RefineOptions(calibration="c.txt", **fields)
    assert e.value.field == field
    assert RefineOptions(calibration="c.txt", objective="pooled+relational", weights=[1, 2]).weights == (1, 2)


def test_train_vectors(tiny_bert, tiny_bert_ft, bert_svd1, calib, tmp_path):
    a = load_file(bert_svd1 / "adapter_model.safetensors")
    vec = [k for k in a if a[k].dim() == 1]
    assert vec  # bias='all': the adapter carries biases
    kw = {"steps": 20, "lr": 1e-3}
    on = run(tiny_bert, tiny_bert_ft, bert_svd1, tmp_path / "on", calib, train_vectors=True, **kw)
    off = run(tiny_bert, tiny_bert_ft, bert_svd1, tmp_path / "off", calib, train_vectors=False, **kw)
    b_on = load_file(tmp_path / "on" / "adapter_model.safetensors")
    b_off = load_file(tmp_path / "off" / "adapter_model.safetensors")
    assert sorted(b_on) == sorted(a) and all(b_on[k].dtype == a[k].dtype for k in a)
    assert on.best_step > 0 and any(not torch.equal(a[k], b_on[k]) for k in vec)  # trained
    assert all(torch.equal(a[k], b_off[k]) for k in vec)  # negative control: frozen
    assert on.trainable_params == off.trainable_params + sum(a[k].numel() for k in vec)


def test_patience_stops_early(tiny_bert, tiny_bert_ft, bert_svd, calib, tmp_path):
    # lr so hot the first scorings do not improve: patience 2 stops after the second
    res = run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "o", calib, steps=40, eval_every=2, lr=1.0, patience=2)
    assert res.steps_run < 40 and res.steps_run % 2 == 0
    assert len(res.curve) - 1 == res.steps_run // 2 and res.steps_per_second > 0
    res = run(tiny_bert, tiny_bert_ft, bert_svd, tmp_path / "o2", calib, steps=40, eval_every=2, lr=1.0)
    assert res.steps_run == 40  # negative control: no patience, every step runs
