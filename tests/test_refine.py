"""refine: surgery.ops.refine (refine_adapter, extract_and_refine) and `surgery refine` / `extract-lora --refine`.

Oracles: PEFT (loads every refined adapter; its outputs must equal our own LoRA
forward, and the fine-tune's outputs are approached on text the refine never saw),
and the adapter files themselves (bytes for the negative control and determinism).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from helpers import calibration_texts as texts
from helpers import one_thread_per_module as one_thread  # noqa: F401 - autouse fixture
from helpers import write_calibration
from surgery.errors import AdapterError, CheckpointError, OptionError
from surgery.ops.extract import extract_lora
from surgery.ops.refine import extract_and_refine, load_student, read_calibration, refine_adapter

warnings.filterwarnings("ignore", module="peft")

STEPS, LR = 40, 1e-2  # tiny models: a short, hot run is enough to move the factors
FP32_TOL = 1e-5       # our LoRA forward vs PEFT's, fp32 outputs


# ----------------------------------------------------------------------------- helpers


def digest(adapter: Path) -> str:
    return hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()


def hf(path, causal: bool):
    from transformers import AutoModel, AutoModelForCausalLM

    return (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path, dtype=torch.float32).eval()


def peft_model(base, adapter, causal: bool, merged: bool = False):
    from peft import PeftModel

    m = PeftModel.from_pretrained(hf(base, causal), str(adapter)).eval()
    return m.merge_and_unload().eval() if merged else m


def batch(base, sample: list[str]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok(sample, padding=True, return_tensors="pt")


def run(model, enc, causal: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return (out.logits if causal else out.last_hidden_state).float()


def pooled_err(student, teacher, enc) -> float:
    """Mean 1 − cos of mean-pooled normalised embeddings (the pooled objective, independently)."""
    m = enc["attention_mask"].unsqueeze(-1).float()

    def pool(h):
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    return float((1 - (pool(run(student, enc, False)) * pool(run(teacher, enc, False))).sum(-1)).mean())


def kl_err(student, teacher, enc) -> float:
    valid = enc["attention_mask"].bool()
    lt = F.log_softmax(run(teacher, enc, True), -1)
    ls = F.log_softmax(run(student, enc, True), -1)
    return float((lt.exp() * (lt - ls)).sum(-1)[valid].mean())


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return write_calibration(tmp_path_factory.mktemp("calib"), 120, seed=1)


@pytest.fixture(scope="module")
def unseen() -> list[str]:
    return texts(24, seed=99)  # never in the calibration file


@pytest.fixture(scope="module")
def bert_svd(tiny_bert, tiny_bert_ft, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bert") / "svd"
    extract_lora(tiny_bert, tiny_bert_ft, out, rank=2, bias="lora")  # the extract default before bias="auto"
    return out


@pytest.fixture(scope="module")
def bert_refined(tiny_bert, tiny_bert_ft, bert_svd, calib):
    out = bert_svd.parent / "refined"
    res = refine_adapter(tiny_bert, bert_svd, out,
                         teacher=tiny_bert_ft, calibration=calib, steps=STEPS, lr=LR, batch_size=8)
    return out, res


# ----------------------------------------------------------------------------- calibration data


def test_read_calibration_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one two\n\n  three  \n")
    assert read_calibration(tmp_path / "a.txt") == ["one two", "three"]
    (tmp_path / "b.jsonl").write_text('{"text": "x y"}\n{"text": "z", "id": 3}\n')
    assert read_calibration(tmp_path / "b.jsonl") == ["x y", "z"]


@pytest.mark.parametrize("content, name, match", [
    ("", "empty.txt", "is empty"),
    ("\n  \n", "blank.txt", "is empty"),
    ('{"text": "a"}\n{"txt": "b"}\n', "bad.jsonl", r"bad.jsonl:2: expected an object"),
    ('{"text": "a"}\nnot json\n', "broken.jsonl", r"broken.jsonl:2: not valid JSON"),
])
def test_read_calibration_errors(tmp_path, content, name, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(OptionError, match=match):
        read_calibration(tmp_path / name)
    with pytest.raises(OptionError, match="not found"):
        read_calibration(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------- behaviour


def test_refine_lowers_heldout_error_encoder(tiny_bert, tiny_bert_ft, bert_svd, bert_refined, unseen):
    out, res = bert_refined
    assert res.objective == "pooled"
    assert res.after.loss < 0.5 * res.before.loss  # held-out, from the report
    assert res.before.loss < res.no_adapter.loss
    assert res.best_step > 0 and res.curve[0].step == 0 and len(res.curve) == 11
    # independently, with PEFT, on text the refine never saw
    enc = batch(tiny_bert, unseen)
    teacher = hf(tiny_bert_ft, False)
    e_svd = pooled_err(peft_model(tiny_bert, bert_svd, False), teacher, enc)
    e_ref = pooled_err(peft_model(tiny_bert, out, False), teacher, enc)
    e_base = pooled_err(hf(tiny_bert, False), teacher, enc)
    assert e_ref < 0.5 * e_svd < e_base
    # negative control: the same measurement does see a worse adapter (the bare base)
    assert not e_base < 0.5 * e_svd


def test_refine_keeps_format(bert_svd, bert_refined):
    from safetensors import safe_open

    out, _ = bert_refined
    with safe_open(bert_svd / "adapter_model.safetensors", "pt") as a, safe_open(out / "adapter_model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert ta.shape == tb.shape and ta.dtype == tb.dtype, k
            if ".lora_" not in k or k.endswith("lora_B.bias"):  # frozen: full tensors and bias deltas
                assert torch.equal(ta, tb), k
        changed = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
        assert changed and all(".lora_A." in k or ".lora_B.weight" in k or "lora_embedding" in k for k in changed)
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (bert_svd, out))
    assert ca == cb


def test_lr_zero_leaves_adapter_identical(tiny_bert, tiny_bert_ft, bert_svd, calib, tmp_path):
    res = refine_adapter(tiny_bert, bert_svd, tmp_path / "r0",
                         teacher=tiny_bert_ft, calibration=calib, steps=10, lr=0.0, batch_size=8)
    assert res.best_step == 0
    assert digest(tmp_path / "r0") == digest(bert_svd)
    assert (tmp_path / "r0" / "adapter_config.json").read_text() == (bert_svd / "adapter_config.json").read_text()
    # negative control: a tiny but nonzero lr changes the bytes
    res = refine_adapter(tiny_bert, bert_svd, tmp_path / "r1",
                         teacher=tiny_bert_ft, calibration=calib, steps=10, lr=1e-3, batch_size=8)
    assert res.best_step > 0 and digest(tmp_path / "r1") != digest(bert_svd)


def test_deterministic(tiny_bert, tiny_bert_ft, bert_svd, bert_refined, calib, tmp_path):
    out, _ = bert_refined
    refine_adapter(tiny_bert, bert_svd, tmp_path / "again",
                   teacher=tiny_bert_ft, calibration=calib, steps=STEPS, lr=LR, batch_size=8)
    assert digest(tmp_path / "again") == digest(out)
    # negative control: another seed draws other batches (and another hold-out split)
    refine_adapter(tiny_bert, bert_svd, tmp_path / "seed1",
                   teacher=tiny_bert_ft, calibration=calib, steps=STEPS, lr=LR, batch_size=8, seed=1)
    assert digest(tmp_path / "seed1") != digest(out)


def test_peft_loads_refined_and_matches_student(tiny_bert, bert_svd, bert_refined, unseen):
    out, _ = bert_refined
    enc = batch(tiny_bert, unseen)
    ours = run(load_student(tiny_bert, out), enc, False)
    torch.testing.assert_close(ours, run(peft_model(tiny_bert, out, False), enc, False), atol=FP32_TOL, rtol=0)
    # negative control: the SVD start is measurably different at this tolerance
    assert (run(load_student(tiny_bert, bert_svd), enc, False) - ours).abs().max() > 100 * FP32_TOL


def test_causal_lm_kl(tiny_llama, tiny_llama_ft, calib, unseen, tmp_path):
    """bf16 Llama, embedding + linear LoRAs, KL objective; the written adapter stays bf16."""
    svd = tmp_path / "svd"
    extract_lora(tiny_llama, tiny_llama_ft, svd, rank=2)
    res = refine_adapter(tiny_llama, svd, tmp_path / "ref",
                         teacher=tiny_llama_ft, calibration=calib, steps=STEPS, lr=LR, batch_size=8)
    assert res.objective == "logits-kl" and res.before.kl is not None and res.before.cosine is None
    assert res.after.loss < 0.7 * res.before.loss
    enc = batch(tiny_llama, unseen)
    teacher = hf(tiny_llama_ft, True)
    k_svd = kl_err(peft_model(tiny_llama, svd, True), teacher, enc)
    k_ref = kl_err(peft_model(tiny_llama, tmp_path / "ref", True), teacher, enc)
    assert k_ref < 0.8 * k_svd
    assert not k_svd < 0.8 * k_svd  # negative control: the same threshold fails for the start
    ours = run(load_student(tiny_llama, tmp_path / "ref"), enc, True)
    # PEFT's bf16 factors are upcast to fp32 like ours: same numbers
    torch.testing.assert_close(ours, run(peft_model(tiny_llama, tmp_path / "ref", True), enc, True),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("bias", ["lora", "skip"])
def test_gpt2_conv1d_tied_head(tiny_gpt2, tiny_gpt2_ft, calib, unseen, tmp_path, bias):
    """Conv1D (fan_in_fan_out) and the tied wte/lm_head: with --bias lora the embeddings are saved
    whole (full tensors loaded into the student); with --bias skip (and serving_safe, without which a
    changed tied embedding is saved whole) wte gets an embedding LoRA whose delta also reaches the
    tied head, as in the merged model."""
    svd = tmp_path / "svd"
    ex = extract_lora(tiny_gpt2, tiny_gpt2_ft, svd, rank=2, bias=bias, serving_safe=bias == "skip")
    assert ("transformer.wte.weight" in ex.full) == (bias == "lora")
    res = refine_adapter(tiny_gpt2, svd, tmp_path / "ref",
                         teacher=tiny_gpt2_ft, calibration=calib, steps=20, lr=LR, batch_size=8)
    assert res.after.loss < res.before.loss
    enc = batch(tiny_gpt2, unseen)
    ours = run(load_student(tiny_gpt2, tmp_path / "ref"), enc, True)
    merged = run(peft_model(tiny_gpt2, tmp_path / "ref", True, merged=True), enc, True)
    torch.testing.assert_close(ours, merged, atol=1e-4, rtol=0)
    assert (ours - run(hf(tiny_gpt2, True), enc, True)).abs().max() > 1e-2  # negative control


def test_refine_peft_written_adapter(tiny_bert, tiny_bert_ft, tiny_bert_lora, calib, tmp_path):
    """An adapter PEFT wrote (alpha != r, its own config fields) refines and keeps its config."""
    res = refine_adapter(tiny_bert, tiny_bert_lora, tmp_path / "ref",
                         teacher=tiny_bert_ft, calibration=calib, steps=20, lr=LR, batch_size=8)
    assert res.after.loss < res.before.loss
    from surgery.core.peft_format import read_adapter

    ca, ma, _ = read_adapter(tiny_bert_lora)
    cb, mb, _ = read_adapter(tmp_path / "ref")
    assert sorted(ma) == sorted(mb)
    for m in ma:
        assert ca.rank_for(m) == cb.rank_for(m) and ca.scaling_for(m) == cb.scaling_for(m)
        assert ma[m].A.dtype == mb[m].A.dtype
    assert ca.raw.get("lora_dropout") == cb.raw.get("lora_dropout")
    peft_model(tiny_bert, tmp_path / "ref", False)  # loads


def test_refine_keeps_peft_bias_all(tiny_bert, tiny_bert_ft, calib, tmp_path):
    """extract's default beside embedding LoRAs writes bias deltas with PEFT's bias='all': refine
    keeps them as such (frozen), not as modules_to_save."""
    from safetensors.torch import load_file

    extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "svd", rank=2)
    res = refine_adapter(tiny_bert, tmp_path / "svd", tmp_path / "ref", teacher=tiny_bert_ft, calibration=calib,
                         steps=20, lr=1e-3, batch_size=8)
    assert res.after.loss < res.before.loss
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path / "svd", tmp_path / "ref"))
    assert ca == cb and ca["bias"] == "all"
    a, b = load_file(tmp_path / "svd" / "adapter_model.safetensors"), load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(".bias"))  # frozen
    assert any(not torch.equal(a[k], b[k]) for k in a if ".lora_" in k)  # trained
    peft_model(tiny_bert, tmp_path / "ref", False)  # loads


def test_extract_and_refine_api(tiny_bert, tiny_bert_ft, calib, tmp_path):
    ex, res = extract_and_refine(tiny_bert, tiny_bert_ft, tmp_path / "out", calibration=calib, extract={"rank": 2, "bias": "lora"},
                                 steps=10, lr=LR, batch_size=8)
    assert ex.out == tmp_path / "out" and res.out == tmp_path / "out"
    assert res.after.loss < res.before.loss
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary extraction is gone


# ----------------------------------------------------------------------------- errors


def test_errors(tiny_bert, tiny_bert_ft, tiny_llama, bert_svd, calib, tmp_path):
    kw = dict(steps=2, batch_size=4)
    one = tmp_path / "one.txt"
    one.write_text("the model\n")
    with pytest.raises(OptionError, match="too few"):
        refine_adapter(tiny_bert, bert_svd, tmp_path / "o1", teacher=tiny_bert_ft, calibration=one, **kw)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(OptionError, match="is empty"):
        refine_adapter(tiny_bert, bert_svd, tmp_path / "o2", teacher=tiny_bert_ft, calibration=tmp_path / "empty.txt",
                       **kw)
    with pytest.raises(OptionError, match="logits-kl needs a causal"):
        refine_adapter(tiny_bert, bert_svd, tmp_path / "o3",
                       teacher=tiny_bert_ft, calibration=calib, objective="logits-kl", **kw)
    notok = tmp_path / "notok"
    shutil.copytree(tiny_bert, notok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (notok / f).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer"):
        refine_adapter(notok, bert_svd, tmp_path / "o4", teacher=tiny_bert_ft, calibration=calib, **kw)
    with pytest.raises(CheckpointError, match="share an architecture"):
        refine_adapter(tiny_bert, bert_svd, tmp_path / "o5", teacher=tiny_llama, calibration=calib, **kw)
    with pytest.raises(AdapterError):  # a bert adapter on a llama base
        refine_adapter(tiny_llama, bert_svd, tmp_path / "o6", teacher=tiny_llama, calibration=calib, **kw)
    with pytest.raises(OptionError, match="^holdout: "):
        refine_adapter(tiny_bert, bert_svd, tmp_path / "o7", teacher=tiny_bert_ft, calibration=calib, holdout=1.0, **kw)
    with pytest.raises(OptionError, match="^lr: "):
        refine_adapter(tiny_bert, bert_svd, tmp_path / "o8",
                       teacher=tiny_bert_ft, calibration=calib, lr=float("nan"), **kw)
    # extract_and_refine checks the calibration before extracting anything
    with pytest.raises(OptionError, match="too few"):
        extract_and_refine(tiny_bert, tiny_bert_ft, tmp_path / "o9", calibration=one, extract={"rank": 2})
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir() if p.is_dir())


# ----------------------------------------------------------------------------- CLI


def test_cli(tiny_bert, tiny_bert_ft, bert_svd, calib, tmp_path):
    from surgery.cli.main import cli

    r = CliRunner()
    res = r.invoke(cli, ["extract-lora", str(tiny_bert), str(tiny_bert_ft), "-o", str(tmp_path / "a"), "--rank", "2",
                         "--bias", "lora", "--refine", "--calibration", str(calib), "--refine-steps", "10", "--refine-lr", "0.01",
                         "--refine-batch", "8", "--report", str(tmp_path / "rep.json"), "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["refine"]["after"]["loss"] < rep["refine"]["before"]["loss"] and len(rep["refine"]["curve"]) == 11
    assert "held-out loss" in res.stderr and "best" in res.stderr
    res = r.invoke(cli, ["refine", str(tiny_bert), str(bert_svd), "--teacher", str(tiny_bert_ft), "--calibration",
                         str(calib), "-o", str(tmp_path / "b"), "--steps", "5", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 5
    # usage errors exit 2; bad input exits 1 with one line
    res = r.invoke(cli, ["extract-lora", str(tiny_bert), str(tiny_bert_ft), "-o", str(tmp_path / "c"), "--refine"])
    assert res.exit_code == 2 and "--calibration" in res.stderr
    (tmp_path / "empty.txt").write_text("")
    res = r.invoke(cli, ["refine", str(tiny_bert), str(bert_svd), "--teacher", str(tiny_bert_ft), "--calibration",
                         str(tmp_path / "empty.txt"), "-o", str(tmp_path / "d")])
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_card_names_listed_calibration_by_count(tiny_bert, tiny_bert_ft, bert_svd, tmp_path):
    """Calibration given as samples: the model card says how many, never copies the texts (a 4,662-text
    list once made a 1 MB README)."""
    sample = texts(40, seed=5)
    refine_adapter(tiny_bert, bert_svd, tmp_path / "o", teacher=tiny_bert_ft, calibration=sample, steps=1,
                   batch_size=8)
    card = (tmp_path / "o" / "README.md").read_text()
    assert "(40 samples)" in card
    assert not any(t in card for t in sample)  # negative control: the texts were given
