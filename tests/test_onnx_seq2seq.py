"""export-onnx on encoder-decoders (T5, BART, Marian, Whisper): Optimum's seq2seq layout, checked by generation.

onnxruntime is the oracle: every export is decoded there (encoder once, decoder_model on the start
token, then decoder_with_past_model one token per step) and compared with PyTorch `generate` on a
right-padded batch of source prompts (Whisper: random features). The layout expected below is what
`optimum-cli export onnx --task text2text-generation-with-past` (optimum-onnx 0.1.0) writes for the
same tiny models; when /tmp/venv-optimum exists, Optimum's own ORTModelForSeq2SeqLM /
ORTModelForSpeechSeq2Seq must generate PyTorch's tokens from our export. Negative controls: a
corrupted decoder weight fails validation (library and CLI, exit 1); a cache that is not an
EncoderDecoderCache is refused in one line with nothing written.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from fixtures.zoo import build_model, make_model
from surgery.cli.main import cli
from surgery.errors import OptionError, SurgeryError, ValidationError
from surgery.onnx import seq2seq as s2s
from surgery.onnx.export import export_onnx
from surgery.onnx.model import resolve_task
from surgery.onnx.seq2seq_check import validate_seq2seq
from surgery.onnx.tasks import valid_tasks
from surgery.options.export import ExportOptions

ARCHS = ("t5", "bart", "marian", "whisper")
OPTIMUM_PY = Path("/tmp/venv-optimum/bin/python")
GRAPHS = ["decoder_model.onnx", "decoder_with_past_model.onnx", "encoder_model.onnx"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, Path, object]]:
    """{arch: (model dir, export dir, Seq2SeqExport)}: each zoo model exported with task auto."""
    root = tmp_path_factory.mktemp("s2s")
    out = {}
    for arch in ARCHS:
        src = build_model(arch, root / arch)
        res = export_onnx(src, root / f"{arch}-onnx", device="cpu", threads=1)
        out[arch] = (src, root / f"{arch}-onnx", res)
    return out


def _io(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return ({v.name: dims(v) for v in m.graph.input if v.name not in inits},
            {v.name: dims(v) for v in m.graph.output})


@pytest.mark.parametrize("arch", ARCHS)
def test_exports_and_generates_like_pytorch(arch, exports):
    _, out, res = exports[arch]
    assert res.status == "ok" and res.validation.passed
    assert sorted(p.name for p in out.glob("*.onnx")) == GRAPHS
    v = res.validation
    assert v.torch_tokens == v.onnx_tokens and not v.mismatches
    assert all(len(row) == v.new_tokens for rows in v.torch_tokens.values() for row in rows)
    assert len(v.rows) == v.new_tokens * len(v.prompt_lengths) and v.worst.tol_ratio <= 1
    if arch != "whisper":  # a padded batch of different source lengths
        assert v.prompt_lengths["right_padded"] == [3, 8, 13]
    manifest = json.loads((out / "manifest.json").read_text())
    want = "automatic-speech-recognition-with-past" if arch == "whisper" else "text2text-generation-with-past"
    assert manifest["task"] == want and manifest["status"] == "ok"
    assert {"config.json", "generation_config.json"} <= set(manifest["files"]["side_files"])
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()


def test_t5_layout_is_optimums(exports):
    """Names, order and symbolic axes as optimum-cli 0.1.0 writes them for the same tiny T5."""
    _, out, _ = exports["t5"]
    ins, outs = _io(out / "encoder_model.onnx")
    enc = ["batch_size", "encoder_sequence_length"]
    assert ins == {"input_ids": enc, "attention_mask": enc}
    assert outs == {"last_hidden_state": enc + [32]}
    ins, outs = _io(out / "decoder_with_past_model.onnx")
    assert list(ins)[:2] == ["encoder_attention_mask", "input_ids"]
    assert ins["past_key_values.1.decoder.value"] == ["batch_size", 4, "past_decoder_sequence_length", 8]
    assert ins["past_key_values.1.encoder.key"] == ["batch_size", 4, "encoder_sequence_length", 8]
    assert list(outs)[:3] == ["logits", "present.0.decoder.key", "present.0.decoder.value"]
    assert outs["present.1.decoder.key"] == ["batch_size", 4, "past_decoder_sequence_length + decoder_sequence_length",
                                             8]
    assert not any(".encoder." in n for n in outs) and len(ins) == 2 + 2 * 4
    ins, outs = _io(out / "decoder_model.onnx")
    assert list(ins) == ["encoder_attention_mask", "input_ids", "encoder_hidden_states"]
    assert outs["present.0.encoder.key"] == ["batch_size", 4, "encoder_sequence_length", 8]
    assert outs["logits"] == ["batch_size", "decoder_sequence_length", 96]


def test_whisper_layout_is_optimums(exports):
    _, out, _ = exports["whisper"]
    ins, outs = _io(out / "encoder_model.onnx")
    assert ins == {"input_features": ["batch_size", 16, 64]} and outs == {"last_hidden_state": ["batch_size", 32, 32]}
    ins, _ = _io(out / "decoder_with_past_model.onnx")
    assert "encoder_attention_mask" not in ins and list(ins)[0] == "input_ids"
    ins, _ = _io(out / "decoder_model.onnx")
    assert list(ins) == ["input_ids", "encoder_hidden_states"]


def _corrupt(path: Path) -> None:
    """Scale the largest float initializer of a graph by 1.5 (a wrong decoder weight)."""
    m = onnx.load(str(path))
    t = max((t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT), key=lambda t: len(t.raw_data))
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1.5), t.name))
    onnx.save(m, str(path))


def test_corrupted_decoder_weight_fails_validation(exports, tmp_path):
    import shutil

    src, out, _ = exports["bart"]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    _corrupt(bad / "decoder_with_past_model.onnx")
    model = make_model("bart")
    with pytest.raises(ValidationError) as e:
        validate_seq2seq(model, bad, device="cpu")
    assert "\n" not in str(e.value) and not e.value.report.passed
    assert validate_seq2seq(model, out, device="cpu").passed  # the control: the intact export passes


def test_cli_corrupted_decoder_exits_1(monkeypatch, tmp_path):
    real = s2s._export_graphs

    def corrupting(tmp, *args, **kwargs):
        graphs = real(tmp, *args, **kwargs)
        _corrupt(tmp / "decoder_model.onnx")
        return graphs

    monkeypatch.setattr(s2s, "_export_graphs", corrupting)
    src = build_model("t5", tmp_path / "t5")
    r = CliRunner().invoke(cli, ["export-onnx", str(src), "-o", str(tmp_path / "out"), "--device", "cpu", "--quiet",
                                 "--no-cache"])
    assert r.exit_code == 1, r.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "failed"


def test_without_cache_writes_encoder_and_decoder_only(tmp_path):
    src = build_model("marian", tmp_path / "marian")
    r = CliRunner().invoke(cli, ["export-onnx", str(src), "-o", str(tmp_path / "out"), "--device", "cpu", "--quiet",
                                 "--task", "text2text-generation"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*.onnx")) == ["decoder_model.onnx", "encoder_model.onnx"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["task"] == "text2text-generation"


def test_cache_that_is_not_encoder_decoder_is_refused(tmp_path):
    from transformers import DynamicCache

    model = make_model("t5")
    real = model.forward

    @functools.wraps(real)  # keeps forward's signature (probe_seq2seq reads it)
    def flat_cache(*args, **kwargs):
        out = real(*args, **kwargs)
        out["cache" if "cache" in out else "past_key_values"] = DynamicCache()
        return out

    model.forward = flat_cache
    with pytest.raises(SurgeryError) as e:
        s2s.export_seq2seq(model, tmp_path / "out", device="cpu")
    assert "\n" not in str(e.value) and "EncoderDecoderCache" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_causal_lm_is_not_a_seq2seq(tmp_path):
    with pytest.raises(SurgeryError, match="not an encoder-decoder"):
        s2s.export_seq2seq(make_model("llama"), tmp_path / "out", validate=False)
    src = build_model("llama", tmp_path / "llama")
    r = CliRunner().invoke(cli, ["export-onnx", str(src), "-o", str(tmp_path / "o"), "--task",
                                 "text2text-generation-with-past"])
    # the task check names the valid tasks, like every task that does not apply (exit 1, one line)
    assert r.exit_code == 1 and "does not apply to llama" in r.output and not (tmp_path / "o").exists()


def test_auto_task_and_options():
    for arch, want in (("T5ForConditionalGeneration", "t5"), ("BartForConditionalGeneration", "bart"),
                       ("MarianMTModel", "marian")):
        assert resolve_task("auto", {"model_type": want, "architectures": [arch]}) == "text2text-generation"
        assert "text2text-generation" in valid_tasks(want)
    assert resolve_task("auto", {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"]}) \
        == "speech2seq-lm"
    for task in ("text2text-generation", "text2text-generation-with-past", "automatic-speech-recognition-with-past"):
        assert ExportOptions(task=task).task == task
    with pytest.raises(OptionError) as e:
        ExportOptions(task="text2text-generation-with-past", cache=False)
    assert e.value.field == "cache"
    with pytest.raises(OptionError) as e:
        ExportOptions(task="text2text-generation-with-past", optimize=True)
    assert e.value.field == "optimize"


def test_exporter_auto_is_legacy_first_and_an_asked_one_runs_alone(tmp_path):
    """auto: every graph from the legacy exporter, each checked against PyTorch at other sizes (the
    note says so); an asked exporter runs alone; a bad name is refused before the model loads."""
    src = build_model("marian", tmp_path / "marian")
    r = export_onnx(src, tmp_path / "auto", device="cpu", validate=False)
    graphs = r.manifest["files"]["graphs"].values()
    assert r.manifest["exporter"] == "legacy" and all("matched PyTorch" in g["note"] for g in graphs)
    r = export_onnx(src, tmp_path / "dyn", exporter="dynamo", cache=False, device="cpu", validate=False)
    assert r.manifest["exporter"] == "dynamo"
    with pytest.raises(OptionError) as e:
        export_onnx(src, tmp_path / "bad", exporter="fast", device="cpu")
    assert e.value.field == "exporter" and not (tmp_path / "bad").exists()


_OPTIMUM_SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch, transformers
src, out = sys.argv[1], sys.argv[2]
cfg = transformers.AutoConfig.from_pretrained(src)
g = torch.Generator().manual_seed(0)
if cfg.model_type == "whisper":
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq as ORT
    ref = transformers.WhisperForConditionalGeneration.from_pretrained(src).eval()
    inputs = {"input_features": torch.randn(2, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g)}
else:
    from optimum.onnxruntime import ORTModelForSeq2SeqLM as ORT
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(src).eval()
    ids = torch.randint(3, cfg.vocab_size - 2, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[1, 7:] = 0
    inputs = {"input_ids": ids.masked_fill(mask == 0, cfg.pad_token_id), "attention_mask": mask}
ort = ORT.from_pretrained(out, use_cache=True)
assert ort.use_cache
kw = dict(do_sample=False, num_beams=1, max_new_tokens=8, min_new_tokens=8)
with torch.no_grad():
    a, b = ref.generate(**inputs, **kw), ort.generate(**inputs, **kw)
print(json.dumps({"torch": a.tolist(), "ort": b.tolist()}))
"""


@pytest.mark.skipif(not OPTIMUM_PY.is_file(), reason="no /tmp/venv-optimum (optimum-onnx) to run the export in")
@pytest.mark.parametrize("arch", ARCHS)
def test_optimum_generates_pytorch_tokens_from_our_export(arch, exports, tmp_path):
    src, out, _ = exports[arch]
    script = tmp_path / "check.py"
    script.write_text(_OPTIMUM_SCRIPT)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([str(OPTIMUM_PY), str(script), str(src), str(out)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["torch"] == got["ort"] and len(got["torch"][0]) >= 8


def test_whisper_probe_reads_fixed_frames():
    lay = s2s.probe_seq2seq(make_model("whisper"))
    assert lay.speech and lay.frames == 64 and lay.num_mel_bins == 16 and lay.num_layers == 2
    assert torch.is_tensor(s2s.dummy_inputs(lay, s2s.graph_specs(lay)["encoder_model.onnx"], torch.float32)[0])


def test_fp16_export_matches_on_cpu(tmp_path):
    model = make_model("bart")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = s2s.export_seq2seq(model, tmp_path / "out", dtype="fp16", device="cpu")
    assert res.status == "ok" and res.validation.dtype == "fp16" and res.validation.torch_tokens == \
        res.validation.onnx_tokens
    _, outs = _io(tmp_path / "out" / "decoder_with_past_model.onnx")
    m = onnx.load(str(tmp_path / "out" / "decoder_with_past_model.onnx"), load_external_data=False)
    assert {o.type.tensor_type.elem_type for o in m.graph.output} == {onnx.TensorProto.FLOAT16} and outs
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is never modified
    assert next(model.parameters()).dtype == torch.float32


def test_auto_falls_back_to_dynamo_when_a_legacy_graph_is_wrong(tmp_path, monkeypatch):
    """The gate is real: a legacy encoder graph that computes something else (its weights scaled
    after export) is rejected and that graph comes from dynamo; the others stay legacy and the
    export still validates."""
    import onnx
    from onnx import numpy_helper

    import surgery.onnx.decoder as dec

    real = dec._export_legacy

    def corrupt_encoder(wrapper, args, raw, opset):
        real(wrapper, args, raw, opset)
        if type(wrapper).__name__ == "EncoderGraph":
            proto = onnx.load(str(raw))
            big = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
            big.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(big) * 1.5, big.name))
            onnx.save(proto, str(raw))

    monkeypatch.setattr(dec, "_export_legacy", corrupt_encoder)
    src = build_model("bart", tmp_path / "bart")
    r = export_onnx(src, tmp_path / "out", device="cpu")
    graphs = r.manifest["files"]["graphs"]
    assert r.status == "ok"
    assert graphs["encoder_model.onnx"]["exporter"] == "dynamo"
    assert "differs from PyTorch" in graphs["encoder_model.onnx"]["note"]
    assert {g["exporter"] for n, g in graphs.items() if n != "encoder_model.onnx"} == {"legacy"}
