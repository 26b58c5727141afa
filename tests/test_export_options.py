"""ExportOptions (every rule once, torch-free), the package layout of surgery.onnx (no import
cycle, no environment changes), the single failure path (ValidationError carrying the result),
and the loader's refusal of weights transformers would make up or ignore.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery.errors import CheckpointError, OptionError, ValidationError
from surgery.options.demo import DemoOptions
from surgery.options.export import DEFAULT_OPSET, TOLERANCES, ExportOptions

ROOT = Path(__file__).resolve().parents[1]
ONNX_PKG = ROOT / "surgery" / "onnx"


# ----------------------------------------------------------------------------- the options object


def test_defaults_and_tolerances():
    o = ExportOptions()
    assert (o.task, o.opset, o.dtype, o.device, o.validation) == ("auto", DEFAULT_OPSET, "fp32", "auto", True)
    assert o.tolerances() == (TOLERANCES["fp32"]["atol"], TOLERANCES["fp32"]["rtol"])
    assert ExportOptions(dtype="fp16").tolerances() == (0.1, 0.05)
    assert ExportOptions(dtype="fp16", atol=0.2).tolerances() == (0.2, 0.05)
    assert ExportOptions(atol=0, rtol=0).tolerances() == (0.0, 0.0)  # zero is a tolerance, not "default"
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert ExportOptions(device=device).device == device


def test_frozen_and_adapters_normalised(tmp_path):
    o = ExportOptions(adapters=[tmp_path / "a", "b"])
    assert o.adapters == (tmp_path / "a", "b")
    assert ExportOptions(adapters=tmp_path).adapters == (tmp_path,)  # one path is one adapter
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.dtype = "fp16"  # type: ignore[misc]
    assert json.loads(json.dumps(o.to_json()))["adapters"] == [str(tmp_path / "a"), "b"]


@pytest.mark.parametrize("field,value", [
    ("task", "nope"), ("dtype", "bf16"), ("dtype", "int8"), ("device", "tpu"), ("device", "cuda:x"),
    ("opset", 3), ("opset", "18"), ("opset", True), ("opset", 10_000), ("atol", -1.0), ("atol", float("nan")),
    ("rtol", float("inf")), ("threads", 0), ("adapters", 5), ("optimize", "yes"), ("validation", None),
    ("exporter", "onnxscript"), ("exporter", None),
])
def test_each_rule_names_its_field(field, value):
    with pytest.raises(OptionError, match=f"^{field}: ") as e:
        ExportOptions(**{field: value})
    assert e.value.field == field


def test_build_merges_options_aliases_and_unknown_fields():
    base = ExportOptions(optimize=True)
    assert ExportOptions.build(base) is base
    assert ExportOptions.build(base, dtype="fp16") == ExportOptions(optimize=True, dtype="fp16")
    # the earlier export_onnx keywords still work
    assert ExportOptions.build(None, validate=False, benchmark_threads=2) == ExportOptions(validation=False, threads=2)
    with pytest.raises(OptionError, match="not an export option") as e:
        ExportOptions.build(None, optimise=True)
    assert e.value.field == "optimise"
    with pytest.raises(OptionError, match="options: must be an ExportOptions"):
        ExportOptions.build(DemoOptions())  # type: ignore[arg-type]


def test_demo_options():
    assert DemoOptions.build(None, rank=8) == DemoOptions(rank=8)
    with pytest.raises(OptionError, match="^rank: ") as e:
        DemoOptions(rank=0)
    assert e.value.field == "rank"
    with pytest.raises(OptionError, match="not a demo option"):
        DemoOptions.build(None, dtype="fp16")


# ----------------------------------------------------------------------------- package layout


def _onnx_imports(path: Path) -> set[str]:
    """surgery.onnx modules a module imports (anywhere in it, lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("surgery.onnx."):
            out.add(node.module.rsplit(".", 1)[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("surgery.onnx.")}
    return out


def test_onnx_package_has_no_import_cycle():
    graph = {p.stem: _onnx_imports(p) for p in ONNX_PKG.glob("*.py") if p.stem != "__init__"}
    assert graph["spec"] == set()  # the shared vocabulary imports nothing of the package
    assert "export" not in graph["check"] and "check" not in graph["files"]
    order: list[str] = []

    def visit(mod: str, path: tuple[str, ...]) -> None:
        assert mod not in path, f"import cycle: {' -> '.join(path + (mod,))}"
        for dep in sorted(graph[mod]):
            visit(dep, path + (mod,))
        if mod not in order:
            order.append(mod)

    for mod in sorted(graph):
        visit(mod, ())
    # negative control: the checker finds a cycle when there is one
    graph["spec"] = {"export"}
    with pytest.raises(AssertionError, match="import cycle"):
        visit("export", ())


def test_importing_surgery_onnx_changes_no_environment():
    code = ("import os, sys; before = dict(os.environ); import surgery.options.export; "
            "assert 'torch' not in sys.modules, 'options import torch'; "
            "import surgery.onnx.check, surgery.onnx.export, surgery.ops.pipeline; "
            "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}; "
            "print(sorted(changed))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- one failure path


class _Drift(torch.nn.Module):
    """Multiplies by a Python counter bumped on every call: the export freezes the value it saw,
    so eager PyTorch (called again for validation) disagrees with the graph."""

    def __init__(self, drift: bool):
        super().__init__()
        self.drift, self.calls = drift, 0

    def forward(self, x):  # (batch, 4)
        self.calls += 1
        return x * (self.calls if self.drift else 1.0)


def _export_module(out: Path, drift: bool, **fields):
    from surgery.onnx.export import export_onnx
    from surgery.onnx.spec import InputSpec

    spec = [InputSpec("x", ("batch", 4), torch.float32)]
    return export_onnx(None, out, ExportOptions(device="cpu"), model=_Drift(drift), inputs=spec,
                       outputs={"y": {0: "batch"}}, **fields)


def test_validation_failure_raises_with_the_result(tmp_path):
    ok = _export_module(tmp_path / "ok", drift=False)  # control: the same module without drift passes
    assert ok.status == "ok" and ok.validation and all(r.passed for r in ok.validation)
    assert json.loads(ok.manifest_path.read_text()) == json.loads(json.dumps(ok.to_json(), default=str))
    with pytest.raises(ValidationError, match=r"output 'y' .*manifest status 'failed'") as e:
        _export_module(tmp_path / "bad", drift=True)
    res = e.value.report
    assert res.status == "failed" and res.failed and not all(r.passed for r in res.validation)
    on_disk = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(res.to_json(), default=str))  # one result, one manifest
    assert on_disk["status"] == "failed" and on_disk["validation"]["passed"] is False


def test_not_validated_and_fields_override_options(tmp_path):
    res = _export_module(tmp_path / "o", drift=True, validate=False)  # the earlier keyword
    assert res.status == "not validated" and res.validation == [] and res.provider is None
    assert res.to_json()["validation"] is None


def test_cli_prints_the_table_from_the_error(monkeypatch, tmp_path, tiny_bert):
    """The CLI renders e.report; it never reads manifest.json (there is none here)."""
    import surgery.onnx.export as ex
    from surgery.cli.main import cli
    from surgery.onnx.spec import ValidationRow

    row = ValidationRow("model.onnx", "b1_s5", "last_hidden_state", [1, 5, 32], 0.5, 0.5, 0.1, 9.0, False)

    class Report:
        validation = [row]

    def fail(*args, **kwargs):
        raise ValidationError("ONNX output 'last_hidden_state' differs", report=Report())

    monkeypatch.setattr(ex, "export_onnx", fail)
    r = CliRunner().invoke(cli, ["export-onnx", str(tiny_bert), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1
    assert "b1_s5" in r.output and "FAIL" in r.output and "error: ONNX output" in r.output
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(cli, ["export-onnx", str(tiny_bert), "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 1 and "b1_s5" not in r.output  # -q: no table


@pytest.mark.parametrize("args,flag", [(["--opset", "5"], "--opset"), (["--atol", "-1"], "--atol"),
                                       (["--device", "tpu"], "--device"), (["--threads", "0"], "--threads"),
                                       (["--exporter", "onnxscript"], "--exporter")])
def test_cli_option_errors_name_the_flag(args, flag, tiny_bert, tmp_path):
    from surgery.cli.main import cli

    r = CliRunner().invoke(cli, ["export-onnx", str(tiny_bert), "-o", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and flag in r.output, r.output
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- weights transformers would make up


def test_missing_head_refused_unless_allowed(tiny_bert):
    from surgery.onnx.model import load_hf_model

    with pytest.raises(CheckpointError, match=r"2 weight\(s\) missing .*classifier.*allow_random_head"):
        load_hf_model(tiny_bert, "sequence-classification")
    state = torch.random.get_rng_state()
    a, _, _ = load_hf_model(tiny_bert, "sequence-classification", allow_random_head=True)
    b, _, _ = load_hf_model(tiny_bert, "sequence-classification", allow_random_head=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(a.classifier.weight, b.classifier.weight)  # seeded: the same head every run
    load_hf_model(tiny_bert)  # control: the checkpoint's own task loads


def test_unexpected_weights_refused_but_a_dropped_head_is_fine(tiny_bert, tiny_llama, tmp_path):
    import shutil

    from surgery.onnx.model import load_hf_model

    model, _, task = load_hf_model(tiny_llama, "feature-extraction")  # lm_head left out on purpose
    assert task == "feature-extraction" and type(model).__name__ == "LlamaModel"
    d = tmp_path / "extra"
    shutil.copytree(tiny_bert, d)
    tensors = load_file(d / "model.safetensors")
    tensors["encoder.layer.0.stray.weight"] = torch.zeros(4, 4)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 weight\(s\) unexpected .*encoder.layer.0.stray.weight"):
        load_hf_model(d)


def test_model_class_follows_the_architecture_only_for_its_task():
    import transformers

    from surgery.onnx.model import model_class

    assert model_class("causal-lm", ["LlamaForCausalLM"]) is transformers.LlamaForCausalLM
    assert model_class("feature-extraction", ["LlamaForCausalLM"]) is transformers.AutoModel
    assert model_class("feature-extraction", ["BertModel"]) is transformers.BertModel
    assert model_class("causal-lm", ["pipeline"]) is transformers.AutoModelForCausalLM  # never a non-model
    assert model_class("sequence-classification", None) is transformers.AutoModelForSequenceClassification
