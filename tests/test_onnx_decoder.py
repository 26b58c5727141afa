"""export_decoder_with_past: tiny causal LMs exported WITH a KV cache, checked by greedy generation.

onnxruntime is the oracle: every export is decoded there (prefill with an empty cache, then one
token per step) and compared with PyTorch `generate` on a left-padded batch whose longest prompt
is longer than the export's dummy length. The negative controls perturb one initializer of the
saved graph, or feed a graph without a cache, and must fail.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers as tf
from onnx import numpy_helper

from helpers import copy_export_editing
from surgery.errors import OptionError, SurgeryError, ValidationError
from surgery.onnx.decoder import (
    BATCH,
    DATA_FILE,
    EXPORT_PAST,
    EXPORT_SEQ,
    PAST,
    SEQ,
    TOTAL,
    DecoderWithPast,
    dummy_inputs,
    export_decoder_with_past,
    name_axes,
    probe_layout,
)
from surgery.onnx.decoder_check import GenerationReport, validate_generation
from surgery.onnx.export import max_ir_version_supported

# hidden 32, 2 layers, vocab 100, 4 heads (2 kv heads where the config has them), positions 128
_C = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_C, num_key_value_heads=2)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_C, num_key_value_heads=2, sliding_window=None)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_C, num_key_value_heads=2)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_C, num_key_value_heads=2, head_dim=8)),
    "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**_C)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_C, num_key_value_heads=2)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_C, num_key_value_heads=2, head_dim=8)),
    # a window of 8 tokens: the 21-token prompt exercises the sliding-window mask
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_C, num_key_value_heads=2, head_dim=8,
                                                           sliding_window=8)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_C, num_key_value_heads=2, head_dim=8,
                                                               sliding_window=8)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4,
                                                     n_positions=128, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_C)),
    "gptj": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                     n_positions=128, bos_token_id=1, eos_token_id=2)),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=4, bos_token_id=1, eos_token_id=2)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                  num_attention_heads=4, word_embed_proj_dim=32,
                                                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                                  pad_token_id=0)),
    "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4,
                                                        bos_token_id=1, eos_token_id=2, pad_token_id=0)),
}


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    from surgery.core.hf import quiet

    with quiet():
        return ARCHS[arch]().eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Export once per architecture per module (export is the slow part): {arch: (model, result)}."""
    cache: dict[str, tuple[torch.nn.Module, object]] = {}

    def get(arch: str):
        if arch not in cache:
            model = tiny(arch)
            out = tmp_path_factory.mktemp(arch) / "onnx"
            cache[arch] = (model, export_decoder_with_past(model, out))
        return cache[arch]

    return get


def _io_dims(path: Path) -> dict[str, list]:
    proto = onnx.load(str(path), load_external_data=False)
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}


# ----------------------------------------------------------------------------- architectures


# The list; Bloom (ALiBi, no position_ids) and Gemma-3 add the other code paths.
# Mistral, Qwen3, Phi, Gemma and GPT-J export the same way (bench/bench_decoder.py clients runs them).
TESTED = ["llama", "gpt2", "qwen2", "phi3", "gemma2", "gpt_neox", "opt", "falcon", "bloom", "gemma3"]


@pytest.mark.parametrize("arch", TESTED)
def test_exports_with_past_and_generates_like_pytorch(arch, exports):
    model, r = exports(arch)
    # exporter "auto": the legacy TorchScript exporter, its graph checked at other sizes (check_graph)
    assert r.status == "ok" and r.exporter == "legacy" and r.exporter_note.startswith("auto: "), r.exporter_note
    v = r.validation
    assert isinstance(v, GenerationReport) and v.passed, v.failure_message()
    # a left-padded batch of three lengths, one past the export's dummy length; 16 tokens each
    lengths = v.prompt_lengths["left_padded"]
    assert len(set(lengths)) == 3 and max(lengths) > EXPORT_SEQ + EXPORT_PAST
    assert v.prompt_lengths["single"] and len(v.onnx_tokens["single"]) == 1
    for name in v.prompt_lengths:
        assert v.onnx_tokens[name] == v.torch_tokens[name]
        assert all(len(t) == 16 for t in v.onnx_tokens[name])
    # prefill with an empty cache, then one step per token
    assert [row.past_length for row in v.rows if row.prompt_set == "single"][:2] == [0, 6]
    assert v.worst.tol_ratio <= 1.0 and not v.mismatches
    # the cache layout: (batch, kv_heads, past, head_dim), uniform names
    dims = _io_dims(r.model_path)
    lay = r.layout
    assert dims["past_key_values.0.key"] == [BATCH, lay.num_kv_heads, PAST, lay.head_dim]
    assert dims[f"present.{lay.num_layers - 1}.value"] == [BATCH, lay.num_kv_heads, TOTAL, lay.head_dim]
    assert dims["attention_mask"] == [BATCH, TOTAL]
    assert dims["logits"] == [BATCH, SEQ, lay.vocab_size]
    assert ("position_ids" in dims) == ("position_ids" in inspect.signature(model.forward).parameters)


def test_llama_layout_files_and_genai_config(exports):
    model, r = exports("llama")
    out = r.out_dir
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "genai_config.json",
                                                     "generation_config.json", "manifest.json", "model.onnx"]
    assert r.data_path is None and not (out / DATA_FILE).exists()  # one file under 2 GB
    names = [i.name for i in onnx.load(str(r.model_path), load_external_data=False).graph.input]
    assert names == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                     "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    proto = onnx.load(str(r.model_path), load_external_data=False)
    assert proto.ir_version <= max_ir_version_supported()
    g = json.loads((out / "genai_config.json").read_text())
    dec = g["model"]["decoder"]
    assert (g["model"]["type"], dec["filename"], dec["head_size"], dec["hidden_size"]) == ("llama", "model.onnx", 8, 32)
    assert (dec["num_attention_heads"], dec["num_key_value_heads"], dec["num_hidden_layers"]) == (4, 2, 2)
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert (g["model"]["eos_token_id"], g["model"]["bos_token_id"], g["model"]["pad_token_id"]) == (2, 1, 0)
    assert g["model"]["context_length"] == 128 and g["search"]["past_present_share_buffer"] is False
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "ok" and m["dtype"] == "fp32" and m["format"] == "text-generation-with-past"
    assert m["validation"]["rows"] and m["files"]["data"] is None
    cfg = tf.AutoConfig.from_pretrained(out)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 2


def test_export_from_directory_copies_tokenizer_and_config(tiny_gpt2, tmp_path):
    r = export_decoder_with_past(tiny_gpt2, tmp_path / "onnx", new_tokens=4)
    assert r.status == "ok"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "onnx" / name).read_bytes() == (tiny_gpt2 / name).read_bytes()
    assert json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]["type"] == "decoder"
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "onnx") is not None


# ----------------------------------------------------------------------------- negative controls


def _perturb_largest(src: Path, dst: Path, scale: float) -> str:
    """Copy an export with its largest float initializer scaled by `scale`; returns its name."""
    def largest(inits):
        floats = [t for t in inits if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        return max(floats, key=lambda t: int(np.prod(t.dims)))

    return copy_export_editing(src, dst, largest, lambda arr: (arr * scale).astype(arr.dtype))


def test_perturbed_initializer_fails_validation(exports, tmp_path):
    model, r = exports("llama")
    _perturb_largest(r.out_dir, tmp_path / "bad", 1.05)
    with pytest.raises(ValidationError) as ei:
        validate_generation(model, tmp_path / "bad")
    rep = ei.value.report
    assert isinstance(rep, GenerationReport) and not rep.passed and rep.worst.tol_ratio > 1.0
    # the unperturbed copy passes: the failure is the perturbation, not the copy
    _perturb_largest(r.out_dir, tmp_path / "same", 1.0)
    assert validate_generation(model, tmp_path / "same").passed


def test_tolerance_zero_fails(exports):
    model, r = exports("gpt2")
    rep = validate_generation(model, r.out_dir, atol=0.0, rtol=0.0, new_tokens=2, raise_on_failure=False)
    assert not rep.passed and rep.worst.tol_ratio > 1.0


def test_graph_without_cache_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    (tmp_path / "d").mkdir()
    onnx.save_model(proto, str(tmp_path / "d" / "model.onnx"))
    with pytest.raises(ValidationError, match="no past_key_values"):
        validate_generation(tiny("llama"), tmp_path / "d")


# ----------------------------------------------------------------------------- fp16


def test_fp16_export_runs_on_cpu_and_matches(tmp_path):
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        r = export_decoder_with_past(model, tmp_path / "fp16", dtype="fp16")
    except ValidationError as e:  # onnxruntime's CPU provider lacks an fp16 kernel the graph needs
        if e.report is not None and e.report.error and "onnxruntime failed" in e.report.error:
            pytest.skip(f"onnxruntime CPU cannot run this fp16 graph: {e.report.error}")
        raise
    assert r.status == "ok" and r.validation.dtype == "fp16"
    sess_types = {i.name: i.type for i in __import__("onnxruntime").InferenceSession(
        str(r.model_path), providers=["CPUExecutionProvider"]).get_inputs()}
    assert sess_types["past_key_values.0.key"] == "tensor(float16)"
    assert json.loads((r.out_dir / "manifest.json").read_text())["dtype"] == "fp16"
    assert r.validation.onnx_tokens == r.validation.torch_tokens
    # the caller's fp32 model is untouched (fp16 was a copy)
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    # negative control at fp16 tolerance
    _perturb_largest(r.out_dir, tmp_path / "bad", 1.2)
    assert not validate_generation(model, tmp_path / "bad", raise_on_failure=False).passed


# ----------------------------------------------------------------------------- refusals and options


def test_recurrent_model_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                               state_size=4)).eval()
    with pytest.raises(SurgeryError) as ei:
        export_decoder_with_past(model, tmp_path / "mamba")
    msg = str(ei.value)
    assert "\n" not in msg and "recurrent" in msg and "without a cache" in msg
    assert not (tmp_path / "mamba").exists()
    with pytest.raises(SurgeryError):
        probe_layout(model)


@pytest.mark.parametrize("kwargs, field", [({"dtype": "bf16"}, "dtype"), ({"opset": 3}, "opset"),
                                           ({"exporter": "onnxscript"}, "exporter")])
def test_bad_options(kwargs, field, tmp_path):
    with pytest.raises(OptionError) as ei:
        export_decoder_with_past(tiny("llama"), tmp_path / "x", **kwargs)
    assert ei.value.field == field and not (tmp_path / "x").exists()


def test_new_tokens_must_be_positive(exports):
    model, r = exports("llama")
    with pytest.raises(OptionError):
        validate_generation(model, r.out_dir, new_tokens=0)


def test_attention_setting_restored(tmp_path):
    model = tiny("llama")
    model.set_attn_implementation("sdpa")
    r = export_decoder_with_past(model, tmp_path / "o", new_tokens=2)
    assert r.status == "ok" and model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- graph details


def test_ir_version_is_clamped(monkeypatch, exports, tmp_path):
    import surgery.onnx.files as ex
    from surgery.onnx.decoder import save_decoder

    _, r = exports("llama")
    proto = onnx.load(str(r.model_path))
    proto.ir_version = onnx.IR_VERSION  # newer than onnxruntime 1.31 reads
    monkeypatch.setattr(ex, "max_ir_version_supported", lambda: 8)
    save_decoder(proto, tmp_path / "model.onnx")
    assert onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).ir_version == 8
    # the manifest's reader (first field of the file, no weights parsed) agrees with onnx's
    from surgery.onnx.decoder import ir_version

    assert ir_version(tmp_path / "model.onnx") == 8
    assert r.manifest["ir_version"] == onnx.load(str(r.model_path), load_external_data=False).ir_version


def test_external_data_past_the_size_limit(monkeypatch, exports, tmp_path):
    import onnxruntime as ort

    import surgery.onnx.decoder as dec

    _, r = exports("llama")
    proto = onnx.load(str(r.model_path))
    monkeypatch.setattr(dec, "TWO_GB", 1)  # every model is "past 2 GB"
    data = dec.save_decoder(proto, tmp_path / "model.onnx")
    assert data == tmp_path / DATA_FILE and data.stat().st_size > 0
    locations = {e.value for t in onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {DATA_FILE}
    ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])


def test_name_axes_rejects_fixed_and_tied_axes(exports):
    _, r = exports("llama")
    lay = r.layout
    fixed = onnx.load(str(r.model_path), load_external_data=False)
    fixed.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5  # sequence_length fixed
    with pytest.raises(ValidationError, match="not symbolic"):
        name_axes(fixed, lay)
    tied = onnx.load(str(r.model_path), load_external_data=False)
    past = next(v for v in tied.graph.input if v.name == "past_key_values.0.key")
    past.type.tensor_type.shape.dim[2].dim_param = SEQ  # past tied to sequence
    with pytest.raises(ValidationError, match="tied"):
        name_axes(tied, lay)


def test_wrapper_runs_prefill_with_empty_cache():
    model = tiny("qwen2")
    lay = probe_layout(model)
    w = DecoderWithPast(model, lay).eval()
    args = dummy_inputs(lay, torch.float32, past=0, seq=4, batch=2)
    with torch.no_grad():
        logits, *present = w(*args)
        ref = model(input_ids=args[0], attention_mask=args[1], position_ids=args[2]).logits
    assert len(present) == 2 * lay.num_layers and present[0].shape == (2, lay.num_kv_heads, 4, lay.head_dim)
    torch.testing.assert_close(logits, ref)


def _perturb(path: Path) -> None:
    """Add noise to the largest float initializer of a saved graph (loads, computes wrongly). Noise, not
    a constant: a constant shift of an embedding is removed by the next LayerNorm."""
    proto = onnx.load(str(path))
    t = max((t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
            key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(arr + np.random.default_rng(0).standard_normal(arr.shape).astype(arr.dtype),
                                       t.name))
    onnx.save(proto, str(path))


def test_check_graph_passes_the_export_and_catches_a_wrong_graph(exports, tmp_path):
    import shutil

    from surgery.onnx.decoder import check_graph

    model, r = exports("llama")
    wrapper = DecoderWithPast(model, r.layout).eval()
    check_graph(r.model_path, wrapper)  # positive: the legacy graph matches PyTorch at both shape sets
    shutil.copy(r.model_path, tmp_path / "model.onnx")
    _perturb(tmp_path / "model.onnx")  # negative control
    with pytest.raises(ValidationError, match="differs from PyTorch at batch"):
        check_graph(tmp_path / "model.onnx", wrapper)


def _legacy_then_perturbed(dec):
    real = dec._export_legacy

    def wrong(wrapper, args, raw, opset):
        real(wrapper, args, raw, opset)
        _perturb(raw)

    return wrong


def test_auto_falls_back_to_dynamo_when_legacy_fails_or_is_wrong(monkeypatch, tmp_path):
    import surgery.onnx.decoder as dec

    def refuse(*args, **kwargs):
        raise RuntimeError("legacy refused this model")

    monkeypatch.setattr(dec, "_export_legacy", refuse)
    r = export_decoder_with_past(tiny("llama"), tmp_path / "raised", new_tokens=4)
    assert r.exporter == "dynamo" and "legacy export failed (RuntimeError: legacy refused" in r.exporter_note
    assert r.status == "ok" and r.validation.passed
    assert json.loads((tmp_path / "raised" / "manifest.json").read_text())["exporter"] == "dynamo"
    dims = _io_dims(r.model_path)
    assert dims["attention_mask"] == [BATCH, TOTAL] and dims["past_key_values.1.value"][2] == PAST
    monkeypatch.undo()
    monkeypatch.setattr(dec, "_export_legacy", _legacy_then_perturbed(dec))  # loads, symbolic axes, wrong numbers
    r = export_decoder_with_past(tiny("gpt2"), tmp_path / "wrong", new_tokens=4)
    assert r.exporter == "dynamo" and "differs from PyTorch" in r.exporter_note
    assert r.status == "ok" and r.validation.passed
    assert sorted(p.name for p in (tmp_path / "wrong").iterdir() if "onnx" in p.name) == ["model.onnx"]


def test_asked_exporter_runs_alone(monkeypatch, tmp_path):
    """exporter="legacy" / "dynamo": that one only, no fallback, no files on failure; a forced legacy
    graph is not checked by check_graph (validation by generation is the check)."""
    import surgery.onnx.decoder as dec

    monkeypatch.setattr(dec, "_export_dynamo", lambda *a: (_ for _ in ()).throw(RuntimeError("dynamo refused")))
    with pytest.raises(SurgeryError) as e:
        export_decoder_with_past(tiny("llama"), tmp_path / "dyn", exporter="dynamo")
    msg = str(e.value)
    assert "dynamo export failed (RuntimeError: dynamo refused)" in msg and "legacy" not in msg and "\n" not in msg
    assert not (tmp_path / "dyn").exists()
    r = export_decoder_with_past(tiny("llama"), tmp_path / "leg", exporter="legacy", new_tokens=4)
    assert r.exporter == "legacy" and r.exporter_note.startswith("exporter 'legacy' asked") and r.validation.passed
    monkeypatch.setattr(dec, "_export_legacy", _legacy_then_perturbed(dec))
    monkeypatch.setattr(dec, "check_graph", lambda *a: pytest.fail("check_graph ran for an asked exporter"))
    with pytest.raises(ValidationError):  # the wrong graph is caught by validation, files left marked failed
        export_decoder_with_past(tiny("llama"), tmp_path / "bad", exporter="legacy", new_tokens=4)
    assert json.loads((tmp_path / "bad" / "manifest.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_dynamo_exporter_still_generates_like_pytorch(arch, tmp_path):
    """The fallback graph (dynamo) keeps its own check: plain and sliding-window attention."""
    r = export_decoder_with_past(tiny(arch), tmp_path / "o", exporter="dynamo", new_tokens=8)
    assert r.exporter == "dynamo" and r.status == "ok" and r.validation.passed, r.exporter_note
    dims = _io_dims(r.model_path)
    assert dims["attention_mask"] == [BATCH, TOTAL] and dims["present.0.key"][2] == TOTAL


# ----------------------------------------------------------------------------- through export-onnx (CLI)


def _cli(*args):
    from click.testing import CliRunner

    from surgery.cli.main import cli

    return CliRunner().invoke(cli, ["export-onnx", *map(str, args)])


def test_cli_causal_lm_exports_with_past_by_default(tiny_llama, tiny_llama_lora, tmp_path):
    """task auto on a causal LM: the with-past export, adapter merged in memory, self-contained dir,
    validated by generation, benchmark rows; --no-cache keeps the logits-only graph."""
    out = tmp_path / "gen"
    r = _cli(tiny_llama, "-o", out, "--adapter", tiny_llama_lora, "--device", "auto", "--benchmark", "-q")
    assert r.exit_code == 0, r.output
    assert "with its KV cache" in r.output and "status: ok" in r.output
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "genai_config.json", "manifest.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    m = json.loads((out / "manifest.json").read_text())
    assert m["task"] == "text-generation-with-past" and m["status"] == "ok" and m["variant"].startswith("with-past")
    assert m["adapters"] == [str(tiny_llama_lora)] and m["validation"]["mismatches"] == []
    if m["provider"] == "CPUExecutionProvider":  # onnxruntime-gpu without a usable GPU here
        assert m["provider_note"].startswith("CUDA unavailable")
    rows = m["benchmark"]
    assert [b["context"] for b in rows] == [16, 32]  # 240/1024 cut to tiny-llama's 64 positions - 32 new
    assert all(b["same_tokens"] and b["ort_ms_per_token"] > 0 and b["torch_ms_per_token"] > 0 for b in rows)
    assert set(_io_dims(out / "model.onnx")) >= {"past_key_values.0.key", "present.0.value", "position_ids"}
    # the adapter is in the weights: a prefill's logits differ from the base model's export
    import onnxruntime as ort

    base = tmp_path / "base"
    assert _cli(tiny_llama, "-o", base, "--device", "cpu", "-q").exit_code == 0

    def prefill(d):
        s = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in s.get_inputs()
                if i.name.startswith("past_")}
        feed |= {"input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64),
                 "position_ids": np.array([[0, 1, 2]])}
        return s.run(["logits"], feed)[0]

    assert np.abs(prefill(out) - prefill(base)).max() > 1e-3
    # --no-cache: the logits-only graph (inputs ids + mask, no cache)
    lo = tmp_path / "logits"
    assert _cli(tiny_llama, "-o", lo, "--no-cache", "--device", "cpu", "-q").exit_code == 0
    assert json.loads((lo / "manifest.json").read_text())["task"] == "causal-lm"
    assert not any(n.startswith("past_") for n in _io_dims(lo / "model.onnx"))


def test_cli_fp16_with_past(tiny_gpt2, tmp_path):
    r = _cli(tiny_gpt2, "-o", tmp_path / "o", "--dtype", "fp16", "--device", "cpu", "--json", "-q")
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["dtype"] == m["kv_dtype"] == "fp16" and m["validation"]["dtype"] == "fp16"
    import onnxruntime as ort

    types = {i.name: i.type for i in ort.InferenceSession(str(tmp_path / "o" / "model.onnx"),
                                                          providers=["CPUExecutionProvider"]).get_inputs()}
    assert types["past_key_values.1.value"] == "tensor(float16)"


def test_cli_generation_validation_failure_exits_1(tiny_gpt2, tmp_path):
    out = tmp_path / "o"
    r = _cli(tiny_gpt2, "-o", out, "--atol", "0", "--rtol", "0", "--device", "cpu", "-q")
    assert r.exit_code == 1 and "manifest status 'failed'" in r.output
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert (out / "model.onnx").is_file()


def test_cli_recurrent_model_refused_nothing_written(tmp_path):
    torch.manual_seed(0)
    tf.MambaForCausalLM(tf.MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                       state_size=4)).save_pretrained(tmp_path / "mamba")
    r = _cli(tmp_path / "mamba", "-o", tmp_path / "o", "-q")
    assert r.exit_code == 1 and "recurrent" in r.output and "without a cache" in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "o").exists()


def test_with_past_option_conflicts():
    from surgery.options.export import ExportOptions

    with pytest.raises(OptionError, match="cache"):
        ExportOptions(task="text-generation-with-past", cache=False)
    with pytest.raises(OptionError, match="optimize"):
        ExportOptions(task="text-generation-with-past", optimize=True)
