"""Hardening II, the operations: every file a command reads is an input, every output is
checked before work, allocations are sized first, hostile names and patterns are defused.

 1. refine's calibration file is an input (`-o` its directory with --overwrite deleted it).
 2. export-onnx / the loaders: config.json that does not match the weights (layers, sizes),
    a quantization_config, a malformed factorization.json / bottleneck config: one line.
 3. extract-lora never stores non-finite factors (values near the fp32 limit, a cast to fp16).
 4. plots and reports never land in an input or on another output; a report lands with its
    output or not at all (a full disk is found before the output is written).
 5. a 1 TiB tensor (a sparse file), or an SVD rank to match: refused before allocating.
 6. empty matrices are skipped with a reason; float8 weights are analysed.
 7. ENOSPC while extract-lora writes: one OutputError line, nothing left behind.
 8. names from checkpoints are escaped in tables and messages.
 9. check_regex refuses catastrophic-backtracking patterns (ReDoS) wherever users give one.

Everything runs on private copies of the fixtures in tmp_path, offline. Each test checks the
exit code or exception type, the one-line message, that nothing was left beside the output,
and that its inputs are unchanged (hashed before and after).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import surgery.io.writer as wmod
from helpers import FullDisk, raises_one_line, tree_state
from surgery.cli.main import cli
from surgery.core.tensors import available_memory, check_fits, matrix_bytes
from surgery.errors import (
    AdapterError,
    CheckpointError,
    OptionError,
    OutputError,
    ResourceError,
    SurgeryError,
    ValidationError,
)
from surgery.io.guards import MAX_REGEX_CHARS, check_output_file, check_regex, staged_text

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
TIB = 2**40


# ----------------------------------------------------------------------------- helpers


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line(r, needle: str | None = None, code: int = 1) -> str:
    """The exit code, one 'error:' line on stderr (exit 1) or a usage error (exit 2), no traceback."""
    assert r.exit_code == code, f"exit {r.exit_code}: {r.output}"
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    line = lines[-1]
    if needle:
        assert re.search(needle, line), line
    return line


def leftovers(*dirs: Path) -> list[str]:
    """Temporary entries (ours, or a refine's extraction dir) left in the directories."""
    return [p.name for d in dirs if d.is_dir() for p in d.iterdir() if ".surgery-tmp-" in p.name
            or ".extract-" in p.name]


@pytest.fixture
def inp(tmp_path) -> dict[str, Path]:
    """Private copies of the fixtures this file reads, under tmp_path/in."""
    d = tmp_path / "in"
    d.mkdir()
    out = {}
    for name in ("tiny-bert", "tiny-bert-ft", "tiny-bert-lora"):
        shutil.copytree(FIX / name, d / name)
        out[name] = d / name
    return out


def calibration(path: Path, n: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(f"a short calibration sample number {i}" for i in range(n)) + "\n")
    return path


def save_model(d: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    d.mkdir(parents=True)
    save_file(tensors, str(d / "model.safetensors"))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def sparse_checkpoint(d: Path, n: int = 2**19, name: str = "l.weight") -> Path:
    """A consistent safetensors file declaring an (n, n) fp32 tensor (1 TiB at 2^19) over a
    sparse file: no byte of it is ever written or read."""
    d.mkdir(parents=True)
    raw = json.dumps({name: {"dtype": "F32", "shape": [n, n], "data_offsets": [0, 4 * n * n]}}).encode()
    raw += b" " * (-len(raw) % 8)
    p = d / "model.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(p, 8 + len(raw) + 4 * n * n)
    return d


# ----------------------------------------------------------------------------- 1. calibration is an input


def test_refine_never_writes_over_its_calibration_file(inp, tmp_path):
    d = tmp_path / "D"
    cal = calibration(d / "texts.txt")
    before, before_inputs = tree_state(*inp.values(), d), tree_state(*inp.values())
    base, lora, ft = inp["tiny-bert"], inp["tiny-bert-lora"], inp["tiny-bert-ft"]
    r = run(["refine", base, lora, "--teacher", ft, "--calibration", cal, "-o", d, "--overwrite", "--steps", "1"])
    one_line(r, r"output .*D is the input .*texts\.txt")
    # the library alone, and through extract-lora --refine's entry point
    from surgery.ops.refine import extract_and_refine, refine_adapter

    raises_one_line(OutputError, lambda: refine_adapter(base, lora, d, teacher=ft, calibration=cal, overwrite=True),
                    "is the input")
    raises_one_line(OutputError, lambda: extract_and_refine(base, ft, d, calibration=cal, overwrite=True),
                    "is the input")
    assert tree_state(*inp.values(), d) == before and leftovers(tmp_path, d) == []
    # negative control: the same run with -o beside the file works, and leaves the file be
    r = run(["refine", base, lora, "--teacher", ft, "--calibration", cal, "-o", d / "out", "--steps", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert tree_state(*inp.values()) == before_inputs and tree_state(cal) == {str(cal): before[str(cal)]}


def test_calibration_fifo_and_bad_jsonl_are_one_line(tmp_path):
    from surgery.ops.refine import read_calibration

    fifo = tmp_path / "texts.txt"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    raises_one_line(OptionError, lambda: read_calibration(fifo), r"FIFO .*refusing to read it")
    assert time.perf_counter() - t0 < 5  # refused unopened, never blocked
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "ok"}\n' + '{"text": ' + "[" * 5000 + "]" * 5000 + "}\n")
    msg = raises_one_line(OptionError, lambda: read_calibration(deep), r"deep\.jsonl:2: not valid JSON .*nested")
    assert len(msg) < 300
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"text": "a", "text": "b"}\n')
    raises_one_line(OptionError, lambda: read_calibration(dup), "duplicate key")
    good = tmp_path / "good.jsonl"  # negative control
    good.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert read_calibration(good) == ["a", "b"]


# ----------------------------------------------------------------------------- 2. configs that do not match


def _bert_with(inp, tmp_path, name: str, **config) -> Path:
    d = tmp_path / name
    shutil.copytree(inp["tiny-bert"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(config)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("change, needle", [
    ({"num_hidden_layers": 4}, r"32 weight\(s\) missing for BertModel \(encoder\.layer\.2\..*config\.json describes "
                               r"weights the checkpoint does not hold"),
    ({"hidden_size": 64, "intermediate_size": 128}, r"weight\(s\) mis-shaped for BertModel .*checkpoint \(32,\), "
                                                    r"config\.json \(64,\).*hidden_size"),
    ({"vocab_size": 200}, r"1 weight\(s\) mis-shaped .*embeddings\.word_embeddings\.weight \(checkpoint \(100, 32\), "
                          r"config\.json \(200, 32\)\)"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
     r"a quantized model \(quantization_config, quant_method 'bitsandbytes'\); .*dequantize"),
])
def test_export_refuses_a_config_that_does_not_match_the_weights(inp, tmp_path, change, needle):
    model = _bert_with(inp, tmp_path, "m", **change)
    before = tree_state(*inp.values(), model)
    out = tmp_path / "onnx"
    one_line(run(["export-onnx", model, "-o", out, "-q"]), needle)
    assert not out.exists() and leftovers(tmp_path) == [] and tree_state(*inp.values(), model) == before


def test_loaders_refuse_quantized_and_mismatched_configs(inp, tmp_path):
    from surgery.core.hf import load_pretrained
    from surgery.ops.factorize import factorize
    from surgery.ops.init_lora import init_lora

    quant = _bert_with(inp, tmp_path, "q", quantization_config={"quant_method": "gptq", "bits": 4})
    vocab = _bert_with(inp, tmp_path, "v", vocab_size=200)
    before = tree_state(quant, vocab)
    raises_one_line(CheckpointError, lambda: load_pretrained(quant), "quant_method 'gptq'")
    raises_one_line(CheckpointError, lambda: load_pretrained(vocab), r"missing or mis-shaped .*word_embeddings")
    raises_one_line(CheckpointError, lambda: factorize(quant, tmp_path / "f", rank=2), "quantized model")
    raises_one_line(CheckpointError, lambda: init_lora(quant, tmp_path / "i", rank=2), "quantized model")
    assert not (tmp_path / "f").exists() and not (tmp_path / "i").exists() and leftovers(tmp_path) == []
    assert tree_state(quant, vocab) == before
    assert load_pretrained(inp["tiny-bert"]) is not None  # negative control


@pytest.mark.parametrize("meta, needle", [
    ('{"format": "surgery-factorized", "format_version": 1, "modules": {', r"not valid JSON"),
    ('{"format": "surgery-factorized", "format": "x", "format_version": 1, "modules": {}}', "duplicate key 'format'"),
    ("[" * 100 + "]" * 100, "nested deeper than"),
    ('{"format": "surgery-factorized", "format_version": 1, "modules": []}', "'modules' must be an object"),
    ('{"format": "surgery-factorized", "format_version": 1, "modules": {"encoder.layer.0.intermediate.dense": '
     '{"rank": 1099511627776, "in_features": 32, "out_features": 64, "bias": true, "kind": "linear"}}}',
     r"rank 1099511627776 above min\(in=32, out=64\)"),
    ('{"format": "surgery-factorized", "format_version": 1, "modules": {"encoder.layer.0.intermediate.dense": '
     '{"rank": 2, "in_features": 2048, "out_features": 64, "bias": true, "kind": "linear"}}}',
     r"is not a 64x2048 projection"),
    ('{"format": "surgery-factorized", "format_version": 1, "modules": {"encoder.layer.0.intermediate.dense": '
     '{"rank": "2", "in_features": 32, "out_features": 64, "bias": true}}}', "positive integer rank"),
])
def test_malformed_factorization_json_is_one_line(inp, tmp_path, meta, needle):
    from surgery.ops.factorize import factorize, load_factorized

    fact = tmp_path / "fact"
    factorize(inp["tiny-bert"], fact, rank=2, evaluate=False)
    assert load_factorized(fact) is not None  # negative control: the file as written loads
    (fact / "factorization.json").write_text(meta)
    before = tree_state(fact)
    raises_one_line(CheckpointError, lambda: load_factorized(fact), needle)
    one_line(run(["export-onnx", fact, "-o", tmp_path / "onnx", "-q"]), needle)
    assert not (tmp_path / "onnx").exists() and tree_state(fact) == before and leftovers(tmp_path) == []


def test_malformed_bottleneck_config_is_one_line(inp, tmp_path):
    from surgery.ops.bottleneck import init_adapter, load_bottleneck

    ad = tmp_path / "ad"
    init_adapter(inp["tiny-bert"], ad, bottleneck=2)
    assert load_bottleneck(ad).adapters  # negative control
    cfg = json.loads((ad / "bottleneck_config.json").read_text())
    raw = json.dumps(cfg)
    for text, needle in [(raw[:-5], "not valid JSON"), (raw.replace('"format"', '"format": 1, "format"', 1),
                                                         "duplicate key"),
                         (json.dumps({**cfg, "modules": {m: {"dim": 32, "bottleneck": TIB}
                                                         for m in cfg["modules"]}}), r"is shape .* expected"),
                         (json.dumps({**cfg, "modules": {m: {"dim": True, "bottleneck": 2} for m in cfg["modules"]}}),
                          "positive integer 'dim'")]:
        (ad / "bottleneck_config.json").write_text(text)
        raises_one_line(AdapterError, lambda: load_bottleneck(ad), needle)


# ----------------------------------------------------------------------------- 3. non-finite factors


def _pair(tmp_path, dtype, value) -> tuple[Path, Path]:
    b = save_model(tmp_path / "in" / "b", {"l.weight": torch.zeros(8, 8, dtype=dtype), "m.weight": torch.zeros(8, 8)})
    big = torch.full((8, 8), value, dtype=torch.float32)
    big[::2] *= -1
    ft = {"l.weight": big.to(dtype), "m.weight": torch.randn(8, 8, generator=torch.Generator().manual_seed(0))}
    return b, save_model(tmp_path / "in" / "f", ft)


@pytest.mark.parametrize("dtype, value, extra, stored", [
    (torch.float32, 3e38, [], "float32"),  # the SVD itself overflows fp32
    (torch.bfloat16, 3e38, [], "bfloat16"),
    (torch.float32, 1e10, ["--dtype", "fp16"], "float16"),  # finite in fp32, inf once cast to fp16
])
def test_extract_refuses_non_finite_factors(tmp_path, dtype, value, extra, stored):
    base, ft = _pair(tmp_path, dtype, value)
    before = tree_state(tmp_path / "in")
    out = tmp_path / "lora"
    line = one_line(run(["extract-lora", base, ft, "-o", out, "--rank", "2", "-q", *extra]),
                    rf"error: l lora_[AB]: \d+ non-finite value\(s\) in the adapter as stored \({stored}\)")
    assert "exclude this module" in line
    assert not out.exists() and leftovers(tmp_path) == [] and tree_state(tmp_path / "in") == before
    from surgery.ops.extract import extract_lora

    dtype_field = {"dtype": "fp16"} if extra else {}
    raises_one_line(ValidationError, lambda: extract_lora(base, ft, out, rank=2, **dtype_field), r"^l lora_[AB]: ")
    # negative control: the same delta, small enough, is extracted and finite as stored
    base, ft = _pair(tmp_path / "ok", dtype, 1.0)
    r = run(["extract-lora", base, ft, "-o", tmp_path / "ok" / "lora", "--rank", "2", "-q", *extra])
    assert r.exit_code == 0, r.output
    sd = load_file(str(tmp_path / "ok" / "lora" / "adapter_model.safetensors"))
    assert sd and all(bool(torch.isfinite(t.float()).all()) for t in sd.values())


# ----------------------------------------------------------------------------- 4. output paths


def test_plot_never_lands_in_an_input(inp, tmp_path, monkeypatch):
    model, ft = inp["tiny-bert"], inp["tiny-bert-ft"]
    before = tree_state(*inp.values())
    monkeypatch.chdir(model)  # `surgery analyze . --plot spectra.png` from inside the model directory
    one_line(run(["analyze", ".", "--plot", "spectra.png", "-q"]),
             r"plot spectra\.png would be written into the input directory \.")
    monkeypatch.chdir(tmp_path)
    one_line(run(["analyze", ft, "--base", model, "--plot", model / "s.svg", "-q"]), "into the input directory")
    (tmp_path / "link.png").symlink_to(model / "x.png")
    one_line(run(["analyze", model, "--plot", "link.png", "-q"]), "into the input directory")
    assert tree_state(*inp.values()) == before and leftovers(tmp_path, model) == []
    # negative control: beside the input it is written
    r = run(["analyze", model, "--include", "pooler", "--plot", tmp_path / "s.png", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG" and tree_state(*inp.values()) == before


@pytest.mark.parametrize("report, needle", [
    ("{out}", r"report .*out is the output .*out, which is written as a whole"),
    ("{out}/r.json", r"report .*r\.json is inside the output"),
    ("{base}/config.json", r"report .*config\.json would be written into the input directory"),
    ("{cal}", r"report .*texts\.txt is the input"),
    ("{base}/new.json", r"would be written into the input directory"),
    ("{tmp}/missing/r.json", "does not exist"),
])
def test_refine_report_is_checked_before_any_work(inp, tmp_path, report, needle):
    cal = calibration(tmp_path / "cal" / "texts.txt")
    out = tmp_path / "out"
    base, lora, ft = inp["tiny-bert"], inp["tiny-bert-lora"], inp["tiny-bert-ft"]
    rpath = report.format(out=out, base=base, cal=cal, tmp=tmp_path)
    before = tree_state(*inp.values(), cal)
    t0 = time.perf_counter()
    r = run(["refine", base, lora, "--teacher", ft, "--calibration", cal, "-o", out, "--report", rpath,
             "--overwrite", "--steps", "1"])
    one_line(r, needle)
    assert time.perf_counter() - t0 < 5  # refused before any model was loaded
    assert not out.exists() and tree_state(*inp.values(), cal) == before and leftovers(tmp_path) == []


def test_refine_report_lands_with_its_output_or_not_at_all(inp, tmp_path, monkeypatch):
    from surgery.ops.refine import refine_adapter

    cal = calibration(tmp_path / "cal" / "texts.txt")
    base, lora, ft = inp["tiny-bert"], inp["tiny-bert-lora"], inp["tiny-bert-ft"]
    before = tree_state(*inp.values(), cal)
    out, rep = tmp_path / "out", tmp_path / "r.json"
    kw = dict(teacher=ft, calibration=cal, steps=1, report=rep)
    # a full disk when the report is written: found before OUT is touched
    real = Path.write_text

    def full(self, *a, **k):
        if ".surgery-tmp-" in self.name and "r.json" in self.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    raises_one_line(OutputError, lambda: refine_adapter(base, lora, out, **kw), r"^No space left on device writing")
    assert not out.exists() and not rep.exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(Path, "write_text", real)
    # a full disk when the adapter is written: no report either
    monkeypatch.setattr(wmod, "open", FullDisk(100), raising=False)
    raises_one_line(OutputError, lambda: refine_adapter(base, lora, out, **kw), r"^No space left on device writing")
    assert not out.exists() and not rep.exists() and leftovers(tmp_path) == []
    monkeypatch.delattr(wmod, "open")
    # negative control: both land, and the report describes the output
    res = refine_adapter(base, lora, out, **kw)
    data = json.loads(rep.read_text())
    assert (out / "adapter_model.safetensors").is_file() and data["out"] == str(out) and data["steps"] == 1
    assert data["after"]["loss"] == res.after.loss and tree_state(*inp.values(), cal) == before


def test_demo_outputs_are_checked_against_its_inputs_first(inp, tmp_path):
    from surgery.ops.pipeline import run_pipeline

    work = tmp_path / "work"
    base = work / "merged"  # the base model where the demo would write its merged model
    shutil.copytree(inp["tiny-bert"], base)
    before = tree_state(*inp.values(), base)
    raises_one_line(OutputError, lambda: run_pipeline(base, inp["tiny-bert-ft"], work), "is the input")
    raises_one_line(OutputError, lambda: run_pipeline(inp["tiny-bert"], inp["tiny-bert-ft"], inp["tiny-bert"]),
                    "inside the input directory")
    assert sorted(p.name for p in work.iterdir()) == ["merged"]  # no lora/ was extracted first
    assert tree_state(*inp.values(), base) == before and leftovers(work, tmp_path) == []


def test_output_file_guard_and_staging(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.bin").write_bytes(b"x")
    raises_one_line(OutputError, lambda: check_output_file(model / "w.bin", inputs=[model / "w.bin"]), "is the input")
    raises_one_line(OutputError, lambda: check_output_file(tmp_path / "o", others=[tmp_path / "o" / "sub"]),
                    "is inside report")
    raises_one_line(OutputError, lambda: check_output_file(tmp_path / "r.json\x00", what="plot"), "NUL")
    assert check_output_file(tmp_path / "r.json", inputs=[model], others=[tmp_path / "out"]) == tmp_path / "r.json"
    with pytest.raises(RuntimeError), staged_text(tmp_path / "r.json", "{}"):
        raise RuntimeError("the output failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no report, no staged file
    with staged_text(tmp_path / "r.json", "{}") as staged:
        assert staged.read_text() == "{}" and not (tmp_path / "r.json").exists()
    assert (tmp_path / "r.json").read_text() == "{}" and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 5. allocations


@pytest.fixture
def sparse(tmp_path) -> dict[str, Path]:
    return {"b": sparse_checkpoint(tmp_path / "in" / "b"), "f": sparse_checkpoint(tmp_path / "in" / "f")}


@pytest.mark.parametrize("argv, needle", [
    (["analyze", "{b}"], r"analysing l\.weight \(524288, 524288\) needs \d+\.\d GiB of memory"),
    (["analyze", "{f}", "--base", "{b}", "--cap", str(TIB)], r"analysing l\.weight .* needs"),
    (["extract-lora", "{b}", "{f}", "-o", "{out}", "--rank", "2"], r"the fp32 delta of l\.weight needs 1024\.0 GiB"),
    (["factorize", "{b}", "-o", "{out}", "--rank", "2"], r"factorising l\.weight .* needs"),
    (["factorize", "{b}", "-o", "{out}", "--energy", "0.9", "--max-rank", str(TIB), "--min-savings", "0"],
     r"factorising l\.weight .* needs"),
    (["init-lora", "{b}", "-o", "{out}", "--rank", str(2**19)], r"initialising l\.weight .* needs"),
    (["init-adapter", "{b}", "-o", "{out}", "--bottleneck", "2", "--modules", "^l$"],
     r"initialising the adapter of l needs"),
])
def test_a_tebibyte_tensor_is_refused_before_allocating(sparse, tmp_path, argv, needle):
    out = tmp_path / "out"
    before = tree_state(tmp_path / "in")
    t0 = time.perf_counter()
    r = run([a.format(out=out, **sparse) for a in argv])
    line = one_line(r, needle)
    assert "of memory, but only" in line and "is available" in line
    assert time.perf_counter() - t0 < 10 and not out.exists() and leftovers(tmp_path) == []
    assert tree_state(tmp_path / "in") == before


@pytest.mark.parametrize("argv, needle", [
    (["factorize", "{b}", "-o", "{out}", "--rank", str(TIB)], "would be factorised"),
    (["init-lora", "{b}", "-o", "{out}", "--rank", str(TIB)], r"rank 1099511627776 exceeds min\(524288, 524288\)"),
    (["init-adapter", "{b}", "-o", "{out}", "--bottleneck", str(TIB), "--modules", "^l$"], "bottleneck .* exceeds"),
])
def test_a_rank_of_two_to_the_forty_is_one_line(sparse, tmp_path, argv, needle):
    out = tmp_path / "out"
    before = tree_state(tmp_path / "in")
    one_line(run([a.format(out=out, **sparse) for a in argv]), needle)
    assert not out.exists() and leftovers(tmp_path) == [] and tree_state(tmp_path / "in") == before


def test_memory_check_helpers():
    room = available_memory()
    assert room is None or room > 2**20
    check_fits(2**20, "a small tensor")  # negative control: passes
    with pytest.raises(ResourceError, match=r"^x needs 1024\.0 GiB of memory, but only .* is available; fix$"):
        check_fits(TIB, "x", "fix")
    assert issubclass(ResourceError, SurgeryError)
    assert matrix_bytes(2 * 64 * 32, (64, 32), rank=8) == 2 * 64 * 32 + 4 * 64 * 32 + 4 * 96 * 8
    assert matrix_bytes(0, (0, 8)) == 0


# ----------------------------------------------------------------------------- 6. empty and float8 tensors


def test_empty_matrices_are_skipped_with_a_reason(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=g)
    base = save_model(tmp_path / "in" / "b", {"a.weight": a, "z.weight": torch.zeros(0, 8), "y.weight": torch.zeros(8, 0)})
    ft = save_model(tmp_path / "in" / "f", {"a.weight": a + 0.1 * torch.randn(8, 8, generator=g),
                                           "z.weight": torch.zeros(0, 8), "y.weight": torch.zeros(8, 0)})
    before = tree_state(tmp_path / "in")
    from surgery.ops.analyze import analyze
    from surgery.ops.bottleneck import init_adapter
    from surgery.ops.extract import extract_lora
    from surgery.ops.factorize import factorize
    from surgery.ops.init_lora import init_lora

    res = analyze(ft, base)
    assert [m.tensor for m in res.modules] == ["a.weight"]
    assert {s["tensor"]: s["why"].split(":")[0] for s in res.skipped} == {"y.weight": "empty matrix (8, 0)",
                                                                           "z.weight": "empty matrix (0, 8)"}
    ex = extract_lora(base, ft, tmp_path / "lora", rank=2)
    assert [m.module for m in ex.modules] == ["a"] and {s["tensor"] for s in ex.skipped} == {"y.weight", "z.weight"}
    fa = factorize(base, tmp_path / "fact", rank=1, min_savings=0.0, evaluate=False)
    assert {s["module"] for s in fa.skipped if "empty matrix" in s["why"]} == {"y", "z"}
    il = init_lora(base, tmp_path / "init", rank=2)
    assert {s["tensor"] for s in il.skipped if "empty matrix" in s["why"]} == {"y.weight", "z.weight"}
    ia = init_adapter(base, tmp_path / "ad", bottleneck=2, modules=".")
    assert [m.module for m in ia.modules] == ["a"] and any("empty projection" in n for n in ia.notes)
    # nothing but empty matrices: one line, not a ZeroDivisionError
    raises_one_line(OptionError, lambda: init_lora(base, tmp_path / "i2", rank=2, include=["z"]), "non-empty")
    raises_one_line(OptionError, lambda: factorize(base, tmp_path / "f2", rank=1, include=["y"], min_savings=0.0),
                    "would be factorised")
    r = run(["analyze", base, "--include", "z"])
    one_line(r, "no non-empty matrix weight")
    assert tree_state(tmp_path / "in") == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_weights_are_analysed(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 12, generator=g)
    base = save_model(tmp_path / "in" / "b", {"a.weight": w.to(dtype)})
    ft = save_model(tmp_path / "in" / "f", {"a.weight": (w + 0.5 * torch.randn(16, 12, generator=g)).to(dtype)})
    from surgery.ops.analyze import analyze

    res = analyze(ft, base, ranks=[2])
    m = res.modules[0]
    wf, wb = load_file(str(ft / "model.safetensors"))["a.weight"].float(), w.to(dtype).float()
    assert m.weight.norm == pytest.approx(float(wf.norm()), rel=1e-5)  # the upcast values, not garbage
    assert m.delta.norm == pytest.approx(float((wf - wb).norm()), rel=1e-5)
    assert m.delta.norm != pytest.approx(float((wf - w).norm()), rel=1e-3)  # control: fp8 rounding is visible
    r = run(["analyze", ft, "--base", base, "-q"])
    assert r.exit_code == 0 and "a " in r.stdout


# ----------------------------------------------------------------------------- 7. ENOSPC in extract-lora


@pytest.mark.parametrize("budget, close_fails", [(100, False), (20000, False), (100, True)])
def test_enospc_in_extract_is_one_output_error(inp, tmp_path, monkeypatch, budget, close_fails):
    disk = FullDisk(budget, close_fails)
    monkeypatch.setattr(wmod, "open", disk, raising=False)
    before = tree_state(*inp.values())
    out = tmp_path / "new" / "lora"
    r = run(["extract-lora", inp["tiny-bert"], inp["tiny-bert-ft"], "-o", out, "--rank", "2", "-q"])
    line = one_line(r, r"No space left on device writing .*\(ENOSPC\); free some space")
    assert disk.hit and "nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no temp, no output, no "new/" parent
    assert tree_state(*inp.values()) == before


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_enospc_on_a_real_full_disk(inp, tmp_path):
    """On a 24 KiB tmpfs (root only, else skipped): the adapter (~44 KB) cannot fit."""
    small = tmp_path / "small"
    if not _tmpfs(small, "24k"):
        pytest.skip("needs root and mount to make a small tmpfs")
    try:
        r = subprocess.run([sys.executable, "-m", "surgery", "extract-lora", str(inp["tiny-bert"]),
                            str(inp["tiny-bert-ft"]), "-o", str(small / "lora"), "--rank", "2", "-q"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().startswith("error: No space left on device writing") and "\n" not in r.stderr.strip()
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# ----------------------------------------------------------------------------- 8. names escaped


EVIL = "evil\x1b[2J\nmod\u202e"


def test_hostile_names_are_escaped_in_tables_and_messages(tmp_path):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 8, generator=g)
    model = save_model(tmp_path / "in" / "m", {f"{EVIL}.weight": w, "ok.weight": torch.randn(8, 8, generator=g)})
    before = tree_state(tmp_path / "in")
    for argv in (["inspect", model], ["analyze", model, "-q"],
                 ["factorize", model, "-o", tmp_path / "f", "--rank", "1", "--no-check", "--min-savings", "0"]):
        r = run(argv)
        assert r.exit_code == 0, r.output
        assert "\x1b" not in r.output and "\u202e" not in r.output, argv
        assert "evil\\x1b[2J\\nmod\\u202e" in r.output, (argv, r.output)
    # PEFT cannot hold such a module name: refused in one escaped line, nothing written
    one_line(run(["init-lora", model, "-o", tmp_path / "i", "--rank", "1"]), r"'evil\\x1b\[2J\\nmod\\u202e': not a valid")
    assert not (tmp_path / "i").exists() and leftovers(tmp_path) == []
    # in one-line messages too: a NaN in that tensor, and a rank too large for it
    w[0, 0] = float("nan")
    bad = save_model(tmp_path / "in" / "bad", {f"{EVIL}.weight": w})
    line = one_line(run(["analyze", bad, "-q"]), r"evil\\x1b\[2J\\nmod\\u202e\.weight: 1 non-finite value")
    assert "\x1b" not in line
    one_line(run(["init-lora", model, "-o", tmp_path / "i2", "--rank", "9"]), r"for evil\\x1b\[2J\\nmod")
    assert {k: v for k, v in tree_state(tmp_path / "in").items() if "/bad" not in k} == before


# ----------------------------------------------------------------------------- 9. ReDoS


CATASTROPHIC = [r"([a-z_.0-9]*)*X", "(a+)+", "(a|a)*", "(a|aa)+", "(a|ab|b)*c", "(a?)*", "(a*)*", r"(\w+\s?)*$",
                "(x+x+)+y", "(a{1,100}){1,100}", "(.*a){20}", "(?:a|a)*", r"(\d+|\d+\.)*", "(.*)*", "(a+)+?",
                "(?=(a+)+)b", "(a?a)*"]
SAFE = [r"layers\.\d+\.mlp", "attn", "q_proj|k_proj", r"^model\.layers\.(0|1|2)\.", r".*\.(q_proj|v_proj)$",
        r"(attn|mlp)+", "(ab|ac)*x", r"(\.?\d)*", r"(x\d?)*", r"^(?!.*vision).*(q_proj|k_proj)$", r"[a-z]{1,20}",
        r"(a|b){2,3}", "lm_head", r"(?i)QUERY", r"h\.\d+\.attn\.c_attn", r"encoder\.layer\.[0-5]\."]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_check_regex_refuses_catastrophic_patterns(pattern):
    msg = raises_one_line(OptionError, lambda: check_regex(pattern, "include"), r"^include: '.*' has .*exponential")
    assert repr(pattern)[1:-1][:20] in msg
    with pytest.raises(AdapterError):
        check_regex(pattern, "target_modules", error=AdapterError)


def test_check_regex_accepts_ordinary_patterns_and_the_shapes_really_are_slow():
    for p in SAFE:  # negative control: what module filters look like
        assert check_regex(p, "include").pattern == p
    raises_one_line(OptionError, lambda: check_regex("(", "include"), "not a valid regular expression")
    raises_one_line(OptionError, lambda: check_regex("a" * (MAX_REGEX_CHARS + 1), "include"), "1000-character limit")
    raises_one_line(OptionError, lambda: check_regex(3, "include"), "expected a regular expression")
    t0 = time.perf_counter()
    check_regex("(" * 90 + "a" + ")" * 90, "include")  # deep but harmless: parsed quickly
    assert time.perf_counter() - t0 < 1
    # what the guard is for: the refused shape already takes 2^18 steps on 19 characters
    t0 = time.perf_counter()
    re.search("a*$", "a" * 18 + "!")
    t_ok = time.perf_counter() - t0
    t0 = time.perf_counter()
    re.search("(a|a)*$", "a" * 18 + "!")
    assert time.perf_counter() - t0 > 100 * t_ok


def test_regex_guard_everywhere_a_user_gives_a_pattern(inp, tmp_path):
    from surgery.core.layers import module_filter
    from surgery.options.analyze import AnalyzeOptions
    from surgery.options.extract import ExtractOptions
    from surgery.options.init import InitAdapterOptions

    before = tree_state(*inp.values())
    base, ft = inp["tiny-bert"], inp["tiny-bert-ft"]
    with pytest.raises(OptionError) as e:
        AnalyzeOptions(include=["(a+)+"])
    assert e.value.field == "include"
    with pytest.raises(OptionError) as e:
        ExtractOptions(rank=2, exclude=["(a|a)*"])
    assert e.value.field == "exclude"
    with pytest.raises(OptionError) as e:
        InitAdapterOptions(bottleneck=2, modules="([a-z_.0-9]*)*X")
    assert e.value.field == "modules"
    with pytest.raises(OptionError) as e:
        module_filter(include=["attn"], exclude=["(x+x+)+y"])
    assert e.value.field == "exclude"
    for argv, flag in ((["extract-lora", base, ft, "-o", tmp_path / "o", "--rank", "2", "--include", "(a+)+"],
                        "--include"),
                       (["analyze", base, "--exclude", "(a|a)*"], "--exclude"),
                       (["init-adapter", base, "-o", tmp_path / "o", "--bottleneck", "2", "--modules", "(a?)*"],
                        "--modules"),
                       (["factorize", base, "-o", tmp_path / "o", "--rank", "2", "--include", r"(\w+\s?)*$"],
                        "--include")):
        t0 = time.perf_counter()
        line = one_line(run(argv), rf"{flag}: '.*' has .*exponential time", code=2)
        assert time.perf_counter() - t0 < 5, line
    assert not (tmp_path / "o").exists() and tree_state(*inp.values()) == before
    assert module_filter(["attn"], ["dense"])("l.0.attn")  # negative control
