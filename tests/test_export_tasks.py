"""export-onnx breadth: Optimum task names, every head kept, vision/audio inputs, sentence-transformers
pooling in the graph, int8 quantisation checked at the task level.

The oracle for "the head is kept" is independent of the exporter's own validation: the zoo model is
rebuilt from its seed and its forward on a fresh input (a shape unlike the export's) is compared
with onnxruntime's output, shape and values.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from fixtures.zoo import build_model, make_model
from surgery.cli.main import cli
from surgery.errors import CheckpointError, OptionError
from surgery.onnx.export import export_onnx
from surgery.onnx.files import graph_io
from surgery.onnx.model import resolve_task
from surgery.onnx.pooling import pool
from surgery.onnx.quantize import task_metrics
from surgery.onnx.tasks import valid_tasks
from surgery.options.export import ExportOptions

# zoo name -> (task auto picks, {output: head output name in transformers})
HEADS = {
    "bert-mlm": ("fill-mask", {"logits": "logits"}),
    "bert-tok": ("token-classification", {"logits": "logits"}),
    "bert-qa": ("question-answering", {"start_logits": "start_logits", "end_logits": "end_logits"}),
    "bert-mc": ("multiple-choice", {"logits": "logits"}),
    "bert-cls": ("text-classification", {"logits": "logits"}),
    "vit": ("image-classification", {"logits": "logits"}),
    "vit-base": ("image-feature-extraction", {"last_hidden_state": "last_hidden_state"}),
    "convnext": ("image-classification", {"logits": "logits"}),
    "resnet": ("image-classification", {"logits": "logits"}),
    "swin": ("image-classification", {"logits": "logits"}),
    "wav2vec2": ("feature-extraction", {"last_hidden_state": "last_hidden_state"}),
    "wav2vec2-ctc": ("automatic-speech-recognition", {"logits": "logits"}),
    "wav2vec2-cls": ("audio-classification", {"logits": "logits"}),
    "clip": ("zero-shot-image-classification", {"logits_per_image": "logits_per_image",
                                                "logits_per_text": "logits_per_text"}),
}


def _fresh_inputs(session, batch: int = 3) -> dict[str, np.ndarray]:
    """Inputs at a shape none of the export/validation sets uses (batch 3, 9 tokens / 1234 samples, 2 choices)."""
    g = np.random.default_rng(11)
    feed = {}
    for i in session.get_inputs():
        dims = [batch if d == "batch" else {"sequence": 9, "samples": 1234, "choices": 2, "image_batch": 2}.get(d, d)
                for d in i.shape]
        if i.type == "tensor(float)":
            feed[i.name] = g.standard_normal(dims).astype(np.float32)
        elif i.name == "attention_mask":
            feed[i.name] = np.ones(dims, np.int64)
        elif i.name == "token_type_ids":
            feed[i.name] = np.zeros(dims, np.int64)
        else:
            feed[i.name] = g.integers(3, 90, dims).astype(np.int64)
    return feed


def _head_mismatch(name: str, out_dir, outputs: dict[str, str]) -> str | None:
    """None when every ONNX output equals the zoo model's head output (shape and values), else why."""
    sess = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = _fresh_inputs(sess)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
    with torch.no_grad():
        ref = make_model(name)(**{k: torch.from_numpy(v) for k, v in feed.items()}, return_dict=True)
    for onnx_name, hf_name in outputs.items():
        if onnx_name not in got:
            return f"no output {onnx_name}"
        r = ref[hf_name].numpy()
        if got[onnx_name].shape != r.shape:
            return f"{onnx_name}: shape {got[onnx_name].shape} != head {r.shape}"
        if not np.allclose(got[onnx_name], r, atol=1e-4, rtol=1e-3):
            return f"{onnx_name}: max diff {np.abs(got[onnx_name] - r).max():.3g}"
    return None


@pytest.mark.parametrize("name", sorted(HEADS))
def test_auto_keeps_every_head(name, tmp_path):
    task, outputs = HEADS[name]
    src = build_model(name, tmp_path / name)
    r = export_onnx(src, tmp_path / "o", device="cpu")
    assert r.status == "ok" and r.task == task and json.loads(r.manifest_path.read_text())["task"] == task
    assert [o["name"] for o in r.outputs] == list(outputs)
    assert _head_mismatch(name, r.out_dir, outputs) is None
    io = graph_io(r.model_path)
    assert all(dims[0] in ("batch", "image_batch") for dims in io["inputs"].values())
    assert len({tuple(row.shape) for row in r.validation}) >= 2  # the input sets differ in shape


def test_dropped_head_is_detected(tmp_path):
    """Negative control of the head oracle: the backbone of a sequence classifier is not its head.
    (bert-tok would not do: BertForTokenClassification has no pooler, so its BertModel is refused.)"""
    src = build_model("bert-cls", tmp_path / "cls")
    r = export_onnx(src, tmp_path / "o", task="feature-extraction", device="cpu")
    assert r.status == "ok"
    assert "shape" in _head_mismatch("bert-cls", r.out_dir, {"last_hidden_state": "logits"})


def test_backbone_of_a_pooler_less_head(tmp_path):
    """BertForTokenClassification has no pooler: its backbone still exports (last_hidden_state
    never reads the pooler), while a missing encoder weight is still refused."""
    src = build_model("bert-tok", tmp_path / "tok")
    r = export_onnx(src, tmp_path / "o", task="feature-extraction", device="cpu", validate=False)
    assert [o["name"] for o in r.outputs] == ["last_hidden_state"]
    from safetensors.torch import load_file, save_file

    w = load_file(src / "model.safetensors")
    save_file({k: v for k, v in w.items() if "layer.1.output.dense" not in k}, src / "model.safetensors")
    with pytest.raises(CheckpointError, match="layer.1.output.dense"):  # control
        export_onnx(src, tmp_path / "o2", task="feature-extraction", device="cpu")


def test_audio_axes_symbolic(tmp_path):
    r = export_onnx(build_model("wav2vec2-ctc", tmp_path / "w"), tmp_path / "o", device="cpu")
    io = graph_io(r.model_path)
    assert io["inputs"] == {"input_values": ["batch", "samples"]}
    assert all(isinstance(d, str) for d in io["outputs"]["logits"][:2])
    frames = {row.input_set: row.shape[1] for row in r.validation}
    assert len(set(frames.values())) == 3  # three input lengths, three frame counts


# ----------------------------------------------------------------------------- task names and refusals


def test_aliases_and_auto_mapping():
    assert ExportOptions(task="sequence-classification").task == "text-classification"
    assert ExportOptions(task="text-generation").task == "causal-lm"
    assert resolve_task("zero-shot-image-classification", {"model_type": "siglip"}) == "zero-shot-image-classification"
    cases = {("bert", "BertForTokenClassification"): "token-classification",
             ("bert", "BertForMaskedLM"): "fill-mask", ("bert", "BertForQuestionAnswering"): "question-answering",
             ("bert", "BertModel"): "feature-extraction", ("gpt2", "GPT2LMHeadModel"): "causal-lm",
             ("llama", "LlamaForCausalLM"): "causal-lm", ("vit", "ViTForImageClassification"): "image-classification",
             ("vit", "ViTModel"): "image-feature-extraction", ("wav2vec2", "Wav2Vec2ForCTC"):
                 "automatic-speech-recognition", ("wav2vec2", "Wav2Vec2ForSequenceClassification"): "audio-classification",
             ("roberta", "RobertaForSequenceClassification"): "text-classification",
             ("clip", "CLIPModel"): "zero-shot-image-classification"}
    for (mt, arch), task in cases.items():
        assert resolve_task("auto", {"model_type": mt, "architectures": [arch]}) == task, arch
    assert "image-classification" not in valid_tasks("bert") and "fill-mask" not in valid_tasks("vit")


def test_head_without_task_refused_not_dropped():
    with pytest.raises(OptionError, match="BertForPreTraining has a head no export task computes") as e:
        resolve_task("auto", {"model_type": "bert", "architectures": ["BertForPreTraining"]})
    assert e.value.field == "task"


def _cli(*args):
    return CliRunner().invoke(cli, ["export-onnx", *map(str, args)])


def test_cli_task_not_for_architecture(tiny_bert, tmp_path):
    r = _cli(tiny_bert, "-o", tmp_path / "o", "--task", "image-classification", "--device", "cpu")
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "task 'image-classification' does not apply to bert" in lines[0]
    assert "valid tasks: feature-extraction, " in lines[0] and "token-classification" in lines[0]
    assert not (tmp_path / "o").exists()


def test_missing_head_refused_for_every_task(tiny_bert, tmp_path):
    """A head the checkpoint lacks is named and refused, whatever the task; allow_random_head opts in."""
    for task, weight in [("text-classification", "classifier.weight"), ("token-classification", "classifier."),
                         ("question-answering", "qa_outputs."), ("fill-mask", "cls.predictions"),
                         ("multiple-choice", "classifier.")]:
        with pytest.raises(CheckpointError, match=r"weight\(s\) missing for Bert") as e:
            export_onnx(tiny_bert, tmp_path / task, task=task, device="cpu")
        assert weight in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / task).exists()
    r = _cli(tiny_bert, "-o", tmp_path / "o", "--task", "token-classification", "--device", "cpu")
    assert r.exit_code == 1 and "classifier." in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- pooling and int8


def test_pool_math():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.allclose(pool(h, mask, "mean", False)[0], h[0, :2].mean(0))
    assert torch.allclose(pool(h, mask, "cls", False), h[:, 0])
    assert torch.allclose(pool(h, mask, "mean", True).norm(dim=1), torch.ones(2))
    assert not torch.allclose(pool(h, None, "mean", False)[0], h[0, :2].mean(0))  # control: the mask matters


def test_pooling_options_refused(tiny_bert, tmp_path):
    with pytest.raises(OptionError, match="pooling applies to feature-extraction") as e:
        export_onnx(build_model("bert-cls", tmp_path / "c"), tmp_path / "o", pooling="mean", device="cpu")
    assert e.value.field == "pooling"
    with pytest.raises(OptionError, match="normalize needs a pooling"):
        export_onnx(tiny_bert, tmp_path / "o2", normalize=True, device="cpu")
    with pytest.raises(OptionError, match="quantize"):
        ExportOptions(quantize="int8", dtype="fp16")


def test_cls_pooling_tiny_bert(tiny_bert, tmp_path):
    r = export_onnx(tiny_bert, tmp_path / "o", pooling="cls", normalize=True, device="cpu")
    assert r.status == "ok" and r.pooling == {"mode": "cls", "normalize": True}
    sess = ort.InferenceSession(str(r.model_path), providers=["CPUExecutionProvider"])
    feed = _fresh_inputs(sess)
    tok, sent = sess.run(["token_embeddings", "sentence_embedding"], feed)
    want = tok[:, 0] / np.linalg.norm(tok[:, 0], axis=1, keepdims=True)
    assert np.abs(sent - want).max() < 1e-5
    assert np.abs(sent - tok[:, 0]).max() > 1e-2  # control: normalisation really is in the graph


def test_minilm_sentence_embedding_and_int8(minilm_dir, tmp_path):
    """The real all-MiniLM-L6-v2: pooling + Normalize detected from its sentence-transformers files,
    equal to sentence-transformers' own encode; the int8 graph passes the task-level check."""
    r = export_onnx(minilm_dir, tmp_path / "o", quantize="int8", device="cpu")
    assert r.status == "ok" and r.pooling == {"mode": "mean", "normalize": True}
    m = json.loads(r.manifest_path.read_text())
    q = m["quantization"]
    assert q["passed"] and q["thresholds"]["min_cosine"] == 0.99 and m["files"]["int8"]["model"] == "model_int8.onnx"
    assert all(row["min_cosine"] >= 0.99 for row in q["rows"] if row["output"] == "sentence_embedding")
    assert (tmp_path / "o" / "model_int8.onnx.data").is_file()
    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoTokenizer

    sents = ["A man is playing a guitar.", "Stock markets fell sharply on Monday.", "I had pasta"]
    want = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(sents)
    enc = AutoTokenizer.from_pretrained(minilm_dir)(sents, padding=True, return_tensors="np")
    feed = {k: v.astype(np.int64) for k, v in enc.items()}
    for name, bound in [("model.onnx", 1e-5), ("model_int8.onnx", None)]:
        got = ort.InferenceSession(str(tmp_path / "o" / name), providers=["CPUExecutionProvider"]).run(
            ["sentence_embedding"], feed)[0]
        if bound:
            assert np.abs(got - want).max() < bound
        else:
            assert (got * want).sum(1).min() >= 0.99  # unit vectors: the dot product is the cosine


def test_task_metrics_negative_control():
    g = np.random.default_rng(0)
    ref = g.standard_normal((4, 10)).astype(np.float32)
    assert task_metrics("logits", ref, ref, None)["passed"]
    bad = task_metrics("logits", ref, ref[::-1].copy(), None)
    assert not bad["passed"] and bad["top1_agreement"] < 0.9
    noisy = task_metrics("sentence_embedding", ref, ref + 0.3 * g.standard_normal(ref.shape).astype(np.float32), None)
    assert not noisy["passed"] and noisy["min_cosine"] < 0.99
