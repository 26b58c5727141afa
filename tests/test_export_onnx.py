"""export-onnx: tiny BERT / GPT-2 / Llama and the real MiniLM exported (auto: legacy, gated; else dynamo),
validated on onnxruntime.

onnxruntime is the oracle: every export is run there and compared with eager PyTorch; the
negative controls perturb a weight in the saved ONNX, or tighten the tolerance, and must fail.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from surgery.errors import CheckpointError, OptionError, OutputError, SurgeryError, ValidationError
from surgery.onnx.check import validate_onnx
from surgery.onnx.export import export_onnx
from surgery.onnx.files import check_symbolic, clamp_ir_version, graph_io, max_ir_version_supported
from surgery.onnx.model import load_hf_model
from surgery.onnx.spec import TOLERANCES, InputSpec, IOSpec


def _symbolic(dims) -> bool:
    return all(isinstance(d, str) and d for d in dims)


def _assert_layout(out: Path, names=("model.onnx",)) -> None:
    """One graph file + one .data file per model, IR readable by the installed onnxruntime."""
    for name in names:
        assert (out / name).is_file() and (out / (name + ".data")).is_file()
        proto = onnx.load(str(out / name), load_external_data=False)
        assert proto.ir_version <= max_ir_version_supported()
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {name + ".data"}


@pytest.fixture(scope="module")
def bert_export(tiny_bert, tmp_path_factory):
    """tiny BERT, feature-extraction, plain + optimised; shared by several tests (export is the slow part)."""
    out = tmp_path_factory.mktemp("bert") / "onnx"
    return export_onnx(tiny_bert, out, optimize=True, device="cpu")


# ----------------------------------------------------------------------------- exports that must validate


def test_tiny_bert_exports_and_validates(bert_export):
    r = bert_export
    assert r.status == "ok" and r.exporter == "legacy"  # auto: legacy first, its graph passed the gate
    assert r.exporter_note.startswith("auto: the legacy TorchScript exporter (its graph matched PyTorch")
    assert r.provider == "CPUExecutionProvider" and r.provider_note == "CPU requested"
    _assert_layout(r.out_dir, ("model.onnx", "model_optimized.onnx"))
    # 2 files × 3 input sets × 1 output, all within fp32 tolerance
    assert len(r.validation) == 6 and all(row.passed for row in r.validation)
    assert {row.input_set for row in r.validation} == {"b1_s5", "b3_s13", "b4_s11_padded"}
    assert max(row.max_abs_diff for row in r.validation) < TOLERANCES["fp32"]["atol"]
    m = json.loads(r.manifest_path.read_text())
    assert m["status"] == "ok" and m["exporter"] == "legacy" and m["opset"] == 18
    assert set(m["versions"]) >= {"torch", "onnx", "onnxruntime", "transformers"}
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert m["validation"]["execution_provider"] == "CPUExecutionProvider"
    assert m["tolerances"]["atol"] == 1e-4
    # the fusion pass really fired on the (legacy-exported) graph used for the optimised file
    # CPU target: the eager-attention graph (fused Attention measured slower on CPU)
    assert "eager-attention graph for CPU" in m["optimization"]["method"]
    assert not any(p.name.startswith(".") for p in r.out_dir.iterdir())  # no scratch left behind


def test_inputs_and_outputs_are_symbolic(bert_export):
    for name in ("model.onnx", "model_optimized.onnx"):
        io = graph_io(bert_export.out_dir / name)
        for dims in io["inputs"].values():
            assert _symbolic(dims) and dims[0] != dims[1]  # batch and sequence not unified
        assert _symbolic(io["outputs"]["last_hidden_state"][:2])
        assert io["outputs"]["last_hidden_state"][2] == 32


def test_fixed_dimension_is_rejected(bert_export, tmp_path):
    """Negative control for the symbolic check: pin the batch axis of one input to 2."""
    src = bert_export.out_dir / "model.onnx"
    proto = onnx.load(str(src), load_external_data=False)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 2
    onnx.save_model(proto, str(tmp_path / "model.onnx"))
    spec = IOSpec([InputSpec("input_ids"), InputSpec("attention_mask")], {"last_hidden_state": {0: "batch"}})
    check_symbolic(src, spec)  # the real export passes
    with pytest.raises(ValidationError, match=r"input 'input_ids' axis 0 \(batch\) is fixed to 2"):
        check_symbolic(tmp_path / "model.onnx", spec)


def test_tiny_gpt2_causal_lm(tiny_gpt2, tmp_path):
    # the logits-only graph (scoring); task auto would export the decoder with its cache
    r = export_onnx(tiny_gpt2, tmp_path / "o", task="text-generation", device="cpu")
    assert r.status == "ok" and r.manifest["task"] == "causal-lm"
    assert [i["name"] for i in r.manifest["inputs"]] == ["input_ids", "attention_mask"]  # no token_type_ids
    assert r.manifest["outputs"][0]["dims"][:2] == ["batch", "sequence"]
    assert all(row.top1_agreement == 1.0 for row in r.validation)
    assert "b3_s9_left_padded" in {row.input_set for row in r.validation}  # what batched generation feeds
    _assert_layout(r.out_dir)
    _left_padded_rows_match_unpadded(r.model_path, tiny_gpt2)


def _left_padded_rows_match_unpadded(path: Path, model_dir: Path) -> None:
    """Each row of a left-padded batch, run on onnxruntime, equals PyTorch on that row alone (no
    padding): positions come from the mask in the graph. Negative control: PyTorch without
    position_ids on the padded batch (what the graph computed before) is off by far more."""
    import onnxruntime as ort

    model, _, _ = load_hf_model(model_dir)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.arange(3, 3 + 3 * 9, dtype=np.int64).reshape(3, 9) % 90 + 3
    pads = [4, 0, 2]
    mask = (np.arange(9)[None] >= np.array(pads)[:, None]).astype(np.int64)
    ids[mask == 0] = 0
    got = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        wrong = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        for row, pad in enumerate(pads):
            ref = model(torch.from_numpy(ids[row:row + 1, pad:])).logits.numpy()[0]
            assert np.abs(got[row, pad:] - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-3 * np.abs(ref).max()
            if pad:
                assert np.abs(wrong[row, pad:] - ref).max() > 100 * np.abs(got[row, pad:] - ref).max()


def test_tiny_llama_with_adapter_and_optimize(tiny_llama, tiny_llama_lora, tmp_path):
    r = export_onnx(tiny_llama, tmp_path / "o", adapters=[tiny_llama_lora], optimize=True, device="cpu",
                    cache=False)  # logits only: the with-past export has one graph, no optimised file
    assert r.status == "ok" and r.manifest["adapters"] == [str(tiny_llama_lora)]
    # no fusion pass for llama: onnxruntime's offline optimisation, validated like the plain file
    assert "offline" in r.manifest["optimization"]["method"]
    assert {row.file for row in r.validation} == {"model.onnx", "model_optimized.onnx"}
    assert all(row.passed and row.top1_agreement == 1.0 for row in r.validation)
    # the adapter is really in the weights: the merged model's logits differ from the base's
    base, _, _ = load_hf_model(tiny_llama)
    merged, _, _ = load_hf_model(tiny_llama, adapters=[tiny_llama_lora])
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-6)


def test_adapter_export_equals_export_of_merged_directory(tiny_bert, tiny_bert_lora, tmp_path):
    """--adapter merges in memory; exporting `surgery merge`'s output must give the same ONNX outputs."""
    import onnxruntime as ort

    from surgery.ops.merge import merge

    merge(tiny_bert, [tiny_bert_lora], tmp_path / "merged")
    a = export_onnx(tiny_bert, tmp_path / "a", adapters=[tiny_bert_lora], device="cpu")
    b = export_onnx(tmp_path / "merged", tmp_path / "b", device="cpu")
    c = export_onnx(tiny_bert, tmp_path / "c", device="cpu")  # negative control: no adapter
    feed = {"input_ids": np.arange(14, dtype=np.int64).reshape(2, 7) % 90,
            "attention_mask": np.ones((2, 7), dtype=np.int64),
            "token_type_ids": np.zeros((2, 7), dtype=np.int64)}

    def run(r):
        s = ort.InferenceSession(str(r.model_path), providers=["CPUExecutionProvider"])
        names = {i.name for i in s.get_inputs()}
        return s.run(None, {k: v for k, v in feed.items() if k in names})[0]

    ya, yb, yc = run(a), run(b), run(c)
    assert np.abs(ya - yb).max() <= 1e-6
    assert np.abs(ya - yc).max() > 1e-3


def test_bert_sequence_classification_fp16(tiny_bert, tmp_path):
    # tiny-bert is a BertModel: its classifier head is new (seeded random init, explicitly allowed)
    r = export_onnx(tiny_bert, tmp_path / "o", task="sequence-classification", dtype="fp16", device="cpu",
                    allow_random_head=True)
    assert r.status == "ok" and r.manifest["dtype"] == "fp16"
    assert r.manifest["tolerances"]["atol"] == 1e-1 and r.manifest["tolerances"]["rtol"] == 5e-2
    proto = onnx.load(str(r.model_path))
    big = [t for t in proto.graph.initializer if np.prod(t.dims) >= 1024]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 I/O
    assert graph_io(r.model_path)["outputs"]["logits"][0] == "batch"
    assert r.validation[0].shape == [1, 2]  # num_labels 2


def test_custom_module_auto_is_legacy_first(tmp_path, capfd):
    """model= from Python; auto runs the legacy exporter first (a data-dependent branch torch.export
    refuses does not matter to it) and keeps its graph once it matched PyTorch at other sizes."""

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 8)

        def forward(self, x):  # (batch, seq, 16)
            if x.abs().sum() > -1.0:  # always true, but data-dependent: torch.export cannot trace it
                return torch.tanh(self.lin(x))  # (batch, seq, 8)
            return self.lin(x)

    torch.manual_seed(0)
    spec = [InputSpec("x", ("batch", "sequence", 16), torch.float32)]
    capfd.readouterr()
    r = export_onnx(None, tmp_path / "o", model=Branchy(), inputs=spec,
                    outputs={"y": {0: "batch", 1: "sequence"}}, device="auto")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # the library never prints, onnxruntime kept quiet
    assert r.status == "ok" and r.exporter == "legacy"
    if r.provider == "CPUExecutionProvider":  # this machine: onnxruntime-gpu without a usable GPU
        assert r.provider_note.startswith("CUDA unavailable")
    assert r.exporter_note.startswith("auto: the legacy TorchScript exporter (its graph matched")
    assert graph_io(r.model_path)["inputs"]["x"][:2] == ["batch", "sequence"]
    assert all(row.passed for row in r.validation)


class _WrongWhenTraced(torch.nn.Module):
    """Computes something else under the TorchScript tracer: a legacy graph that loads, has symbolic
    axes, and is wrong (what a trace that baked in a size looks like to the gate)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)

    def forward(self, x):
        y = torch.tanh(self.lin(x))
        return y * 1.5 if torch.jit.is_tracing() else y


def test_auto_falls_back_to_dynamo_when_the_legacy_graph_is_wrong(tmp_path):
    torch.manual_seed(0)
    kw = dict(model=_WrongWhenTraced(), inputs=[InputSpec("x", ("batch", "sequence", 16), torch.float32)],
              outputs={"y": {0: "batch", 1: "sequence"}}, device="cpu")
    r = export_onnx(None, tmp_path / "auto", **kw)
    assert r.status == "ok" and r.exporter == "dynamo" and all(row.passed for row in r.validation)
    assert r.exporter_note.startswith("auto: legacy export failed (") and "used torch.onnx.export" in r.exporter_note
    assert "differs from PyTorch on input set 'b1_s5'" in r.exporter_note  # the gate's reason, its set named
    m = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert m["exporter"] == "dynamo" and m["exporter_note"] == r.exporter_note
    # negative control: the legacy graph really is wrong (asked alone, the full validation fails it)
    with pytest.raises(ValidationError, match="differs from PyTorch"):
        export_onnx(None, tmp_path / "leg", exporter="legacy", **kw)


def test_auto_falls_back_to_dynamo_when_legacy_raises(tmp_path, monkeypatch, tiny_bert):
    from surgery.onnx import exporters

    def boom(*a, **k):
        raise RuntimeError("legacy refused this model\nsecond line")

    monkeypatch.setattr(exporters, "export_legacy", boom)
    r = export_onnx(tiny_bert, tmp_path / "o", device="cpu")
    assert r.status == "ok" and r.exporter == "dynamo"
    assert r.exporter_note.startswith("auto: legacy export failed (RuntimeError: legacy refused this model); "
                                      "used torch.onnx")
    # both failing: one line carrying each reason
    def refuse(*a, **k):
        raise RuntimeError("dynamo refused it too")

    monkeypatch.setattr(exporters, "export_dynamo", refuse)
    with pytest.raises(SurgeryError) as e:
        export_onnx(tiny_bert, tmp_path / "both", device="cpu")
    msg = str(e.value)
    assert "legacy export failed (RuntimeError: legacy refused this model); dynamo export failed (RuntimeError: " \
        "dynamo refused it too); try another opset" in msg and "\n" not in msg
    assert not (tmp_path / "both").exists()


def test_exporter_option_runs_only_the_one_asked(tmp_path):
    """exporter="dynamo": no legacy fallback (the module torch.export refuses fails in one line);
    exporter="legacy": the TorchScript exporter straight away, and the note says it was asked."""

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 8)

        def forward(self, x):
            if x.abs().sum() > -1.0:  # data-dependent: torch.export cannot trace it
                return torch.tanh(self.lin(x))
            return self.lin(x)

    torch.manual_seed(0)
    spec = [InputSpec("x", ("batch", "sequence", 16), torch.float32)]
    kw = dict(model=Branchy(), inputs=spec, outputs={"y": {0: "batch", 1: "sequence"}}, device="cpu")
    with pytest.raises(SurgeryError) as e:
        export_onnx(None, tmp_path / "dyn", exporter="dynamo", **kw)
    assert "dynamo exporter" in str(e.value) and "legacy" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "dyn").exists()
    r = export_onnx(None, tmp_path / "leg", exporter="legacy", **kw)
    assert r.status == "ok" and r.exporter == "legacy" and r.exporter_note.startswith("exporter 'legacy' asked")
    assert json.loads((tmp_path / "leg" / "manifest.json").read_text())["exporter"] == "legacy"


def test_real_minilm_optimized(minilm_dir, tmp_path, monkeypatch):
    """The CUDA-target variant (transformer fusions); the fused graph also runs, and is
    validated, on the CPU provider here."""
    import surgery.onnx.optimize as opt

    monkeypatch.setattr(opt, "_cuda_target", lambda device: True)
    r = export_onnx(minilm_dir, tmp_path / "o", optimize=True, device="cpu")
    assert r.status == "ok"
    fused = r.manifest["optimization"]["fused_ops"]
    assert fused.get("Attention") == 6 and fused.get("SkipLayerNormalization") == 12
    assert max(row.max_abs_diff for row in r.validation) < 1e-4
    _assert_layout(r.out_dir, ("model.onnx", "model_optimized.onnx"))


# ----------------------------------------------------------------------------- negative controls


def test_perturbed_weight_fails_validation(bert_export, tiny_bert, tmp_path):
    """Scale one weight matrix in the saved ONNX by 1.5: validation must catch it."""
    model, _, _ = load_hf_model(tiny_bert)
    src = bert_export.out_dir
    validate_onnx(src / "model.onnx", model, "feature-extraction", device="cpu")  # intact file passes
    proto = onnx.load(str(src / "model.onnx"))
    target = max(proto.graph.initializer, key=lambda t: (np.prod(t.dims), t.name))  # a big weight
    arr = numpy_helper.to_array(target) * 1.5
    target.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), target.name))
    onnx.save_model(proto, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data")
    report = validate_onnx(tmp_path / "model.onnx", model, "feature-extraction", device="cpu",
                           raise_on_failure=False)
    assert not report.passed and report.worst.tol_ratio > 1
    with pytest.raises(ValidationError, match=r"'last_hidden_state' of model.onnx differs .* on input set 'b"):
        validate_onnx(tmp_path / "model.onnx", model, "feature-extraction", device="cpu")


def test_fp16_zeroed_classifier_head_fails(tiny_bert, tmp_path):
    """Negative control for the scale-relative tolerance: the classifier weights of an fp16 export
    zeroed. Its logits are small (~0.04), so the old absolute atol 0.1 passed it; atol·scale does not."""
    r = export_onnx(tiny_bert, tmp_path / "o", task="sequence-classification", dtype="fp16", device="cpu",
                    allow_random_head=True)
    model, _, _ = load_hf_model(tiny_bert, "sequence-classification", allow_random_head=True)
    validate_onnx(r.model_path, model, "sequence-classification", dtype="fp16", device="cpu")  # intact: passes
    proto = onnx.load(str(r.model_path))
    heads = [t for t in proto.graph.initializer if "classifier" in t.name and len(t.dims) == 2]
    assert len(heads) == 1
    arr = numpy_helper.to_array(heads[0])
    heads[0].CopyFrom(numpy_helper.from_array(np.zeros_like(arr), heads[0].name))
    onnx.save_model(proto, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data")
    report = validate_onnx(tmp_path / "model.onnx", model, "sequence-classification", dtype="fp16", device="cpu",
                           raise_on_failure=False)
    worst = report.worst
    assert not report.passed and worst.tol_ratio > 1
    assert worst.max_abs_diff < TOLERANCES["fp16"]["atol"]  # the absolute rule would have passed it
    assert worst.scale < TOLERANCES["fp16"]["atol"]


def test_failed_validation_still_writes_files(tiny_bert, tmp_path):
    """An impossible tolerance fails validation; the files land with a manifest marked failed."""
    out = tmp_path / "o"
    msg = r"output 'last_hidden_state' .* input set '.*'.*manifest status 'failed'"
    with pytest.raises(ValidationError, match=msg):
        export_onnx(tiny_bert, out, atol=0.0, rtol=0.0, device="cpu")
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and m["validation"]["passed"] is False
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()


# ----------------------------------------------------------------------------- IR version


def test_ir_version_clamped_to_runtime():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    top = max_ir_version_supported()
    assert 7 <= top <= onnx.IR_VERSION
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = onnx.IR_VERSION  # what onnx 1.23's helpers write (14)
    if onnx.IR_VERSION > top:  # negative control: the unclamped model is refused
        with pytest.raises(Exception, match="IR version"):
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert clamp_ir_version(model) == min(onnx.IR_VERSION, top)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist() == [0.0, 2.0]


# ----------------------------------------------------------------------------- refusals


def test_existing_output_refused(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    lin = torch.nn.Linear(4, 3)
    spec = [InputSpec("x", ("batch", 4), torch.float32)]
    with pytest.raises(OutputError):
        export_onnx(None, out, model=lin, inputs=spec, outputs={"y": {0: "batch"}}, validate=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    r = export_onnx(None, out, model=lin, inputs=spec, outputs={"y": {0: "batch"}}, overwrite=True, device="cpu")
    assert r.status == "ok" and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "o"]  # temp sibling renamed away


def test_remote_code_config_refused(tiny_bert, tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(tiny_bert, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="remote code"):
        export_onnx(d, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_unknown_model_type_and_bad_options(tiny_bert, tmp_path):
    d = tmp_path / "unknown"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "architectures": ["NoSuchModel"]}))
    with pytest.raises(CheckpointError, match="no checkpoint found"):  # no weights: our index says so first
        export_onnx(d, tmp_path / "o")
    shutil.copy(tiny_bert / "model.safetensors", d / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot load"):  # weights, but an architecture nobody knows
        export_onnx(d, tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        export_onnx(tmp_path / "empty", tmp_path / "o")
    for kwargs, pat in [({"dtype": "bf16"}, "dtype"), ({"opset": 3}, "opset"), ({"task": "nope"}, "task"),
                        ({"atol": -1.0}, "atol"), ({"device": "tpu"}, "device")]:
        with pytest.raises(OptionError, match=pat):
            export_onnx(tiny_bert, tmp_path / "o", **kwargs)
