"""Options objects of the SVD tools (analyze, init-lora, init-adapter, factorize) and the helpers
they share: rules checked once and named by field, the CLI mapping fields to flags (exit 2),
torch-free options, blockwise finiteness checks, device / thread / logging hygiene."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery.cli.main import cli
from surgery.errors import CheckpointError, OptionError
from surgery.options.analyze import AnalyzeOptions
from surgery.options.factorize import FactorizeOptions
from surgery.options.init import InitAdapterOptions, InitLoraOptions

ROOT = Path(__file__).resolve().parents[1]
TOOLS = {  # options class -> the keyword arguments that make a valid object
    AnalyzeOptions: {},
    InitLoraOptions: {"rank": 4},
    InitAdapterOptions: {"bottleneck": 4},
    FactorizeOptions: {"rank": 4},
}

# (class, field, bad value): every one must raise OptionError naming that field
BAD = [
    (AnalyzeOptions, "ranks", []),
    (AnalyzeOptions, "ranks", [8, 0]),
    (AnalyzeOptions, "ranks", [True]),
    (AnalyzeOptions, "budget", "2x"),
    (AnalyzeOptions, "budget", "120%"),
    (AnalyzeOptions, "budget", -5),
    (AnalyzeOptions, "exact_max", 0),
    (AnalyzeOptions, "cap", 2.5),
    (AnalyzeOptions, "niter", -1),
    (AnalyzeOptions, "include", ["("]),
    (AnalyzeOptions, "exclude", 5),
    (AnalyzeOptions, "seed", 2**64),
    (AnalyzeOptions, "device", "tpu"),
    (AnalyzeOptions, "threads", 0),
    (InitLoraOptions, "rank", None),
    (InitLoraOptions, "rank", 0),
    (InitLoraOptions, "method", "loftq"),
    (InitLoraOptions, "alpha", 0),
    (InitLoraOptions, "alpha", float("nan")),
    (InitLoraOptions, "svd", "qr"),
    (InitLoraOptions, "oversample", -1),
    (InitLoraOptions, "adapter_dtype", "int8"),
    (InitLoraOptions, "shard_size", 0),
    (InitLoraOptions, "seed", "x"),
    (InitLoraOptions, "overwrite", "yes"),
    (InitAdapterOptions, "bottleneck", -2),
    (InitAdapterOptions, "placement", "middle"),
    (InitAdapterOptions, "modules", "("),
    (InitAdapterOptions, "from_delta", ("base",)),
    (InitAdapterOptions, "activation", "swish2"),
    (InitAdapterOptions, "device", "cuda:x"),
    (FactorizeOptions, "energy", 0.0),
    (FactorizeOptions, "energy", 1.5),
    (FactorizeOptions, "min_savings", 1.0),
    (FactorizeOptions, "max_rank", 0),
    (FactorizeOptions, "shard_size", None),
    (FactorizeOptions, "evaluate", 1),
]


# ----------------------------------------------------------------------------- the objects


@pytest.mark.parametrize("cls,field,value", BAD, ids=lambda v: v if isinstance(v, str) else repr(v))
def test_bad_values_name_their_field(cls, field, value):
    kw = {**TOOLS[cls], field: value}
    if cls is FactorizeOptions and field == "energy":
        kw.pop("rank")
    with pytest.raises(OptionError) as e:
        cls(**kw)
    assert e.value.field == field and str(e.value).startswith(f"{field}:"), str(e.value)


@pytest.mark.parametrize("cls", list(TOOLS), ids=lambda c: c.__name__)
def test_valid_objects_are_frozen_and_round_trip_through_json(cls):
    opts = cls(**TOOLS[cls])  # negative control of the table above: valid values pass
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.device = "cpu"
    data = json.loads(json.dumps(opts.to_json()))
    assert cls(**data) == opts
    assert opts.device == "auto" and opts.threads is None


def test_normalisation_and_derived_values():
    assert AnalyzeOptions(ranks=[32, 8, 8, 4]).ranks == (4, 8, 32)
    assert AnalyzeOptions(include=["a", "b"]).include == ("a", "b")  # lists are stored as tuples
    assert InitLoraOptions(rank=2, exclude="lm_head").exclude == ("lm_head",)  # one pattern, as extract takes it
    assert AnalyzeOptions(budget="1%").budget == "1%" and AnalyzeOptions(budget=10**6).budget == 10**6
    lo = InitLoraOptions(rank=8)
    assert lo.lora_alpha == 8.0 and lo.scaling == 1.0
    assert InitLoraOptions(rank=8, alpha=32).scaling == 4.0
    ad = InitAdapterOptions(bottleneck=2, from_delta=["b", "f"])
    assert ad.from_delta == ("b", "f") and ad.init == "delta" and InitAdapterOptions(bottleneck=2).init == "svd"
    assert FactorizeOptions(energy=0.9).policy == "energy" and FactorizeOptions(rank=3).policy == "rank"
    opts = FactorizeOptions(rank=4)
    assert opts.replace(min_savings=0.5).min_savings == 0.5 and opts.min_savings == 0.2


def test_rank_and_energy_are_exclusive():
    for kw in ({}, {"rank": 4, "energy": 0.9}):
        with pytest.raises(OptionError, match="exactly one") as e:
            FactorizeOptions(**kw)
        assert e.value.field == "rank"


def test_activation_names_match_the_modules():
    from surgery.ops.bottleneck import ACTIVATIONS
    from surgery.options.init import ACTIVATION_NAMES

    assert tuple(ACTIVATIONS) == ACTIVATION_NAMES


def test_options_modules_are_torch_free():
    """Built by the CLI before any heavy import: importing them loads no torch, ops or core."""
    code = ("import sys, json; import surgery.options.analyze, surgery.options.init, surgery.options.factorize; "
            "print(json.dumps(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    mods = set(json.loads(r.stdout))
    heavy = [m for m in mods if m.split(".")[0] in ("torch", "transformers")
             or m.startswith(("surgery.ops", "surgery.core", "surgery.io"))]
    assert "surgery.options.analyze" in mods and heavy == []


def test_cli_command_modules_import_nothing_heavy_at_top():
    for name in ("analyze_cmd", "init_cmd", "factorize_cmd", "inspect_cmd"):
        tree = ast.parse((ROOT / "surgery" / "cli" / "commands" / f"{name}.py").read_text())
        top = [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
        top += [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        bad = [m for m in top if m.split(".")[0] in ("torch", "transformers")
               or m.startswith(("surgery.ops", "surgery.core", "surgery.onnx", "surgery.io"))]
        assert bad == [], f"{name} imports {bad} at module level"


def test_no_op_imports_a_private_helper_of_another():
    for name in ("analyze", "init_lora", "factorize", "bottleneck", "inspect"):
        tree = ast.parse((ROOT / "surgery" / "ops" / f"{name}.py").read_text())
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("surgery."):
                private = [a.name for a in n.names if a.name.startswith("_")]
                assert not private, f"ops/{name}.py imports {private} from {n.module}"


# ----------------------------------------------------------------------------- ops take options or fields


def test_ops_take_an_options_object_and_field_overrides(tiny_bert, tmp_path):
    from surgery.ops.analyze import analyze
    from surgery.ops.factorize import factorize

    opts = AnalyzeOptions(ranks=(2,), include=("pooler",))
    a = analyze(tiny_bert, None, opts)
    b = analyze(tiny_bert, include=["pooler"], ranks=[2])
    assert [m.module for m in a.modules] == [m.module for m in b.modules] == ["pooler.dense"]
    c = analyze(tiny_bert, None, opts, include=["query"])  # a field replaces the object's
    assert len(c.modules) == 2 and all("query" in m.module for m in c.modules)
    with pytest.raises(OptionError) as e:
        factorize(tiny_bert, tmp_path / "f", FactorizeOptions(rank=4), rank=None)
    assert e.value.field == "rank" and not (tmp_path / "f").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_unavailable_device_is_refused_before_any_output(tiny_bert, tmp_path):
    from surgery.ops.init_lora import init_lora

    with pytest.raises(OptionError, match="CUDA is not available"):
        init_lora(tiny_bert, tmp_path / "o", rank=2, device="cuda")
    assert not (tmp_path / "o").exists()
    res = init_lora(tiny_bert, tmp_path / "o", rank=2, include=["pooler"], device="auto")  # control: auto -> cpu
    assert len(res.modules) == 1


def test_threads_apply_during_the_op_and_are_restored(tiny_bert, tmp_path, monkeypatch):
    from surgery.core import lowrank
    from surgery.ops.analyze import analyze

    seen = []
    real = lowrank.truncated_svd

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr("surgery.ops.analyze.truncated_svd", spy)
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    analyze(tiny_bert, include=["pooler"], threads=want)
    assert seen == [want] and torch.get_num_threads() == before
    analyze(tiny_bert, include=["pooler"])  # control: without threads, torch's own setting
    assert seen[-1] == before


def test_factorize_restores_transformers_logging(tiny_bert, tmp_path):
    """The output check loads models quietly and gives the logger its level back."""
    import transformers

    from surgery.ops.factorize import factorize

    transformers.logging.get_verbosity()  # transformers sets its level when first configured: before ours
    lg = logging.getLogger("transformers")
    old = lg.level
    lg.setLevel(logging.INFO)
    try:
        res = factorize(tiny_bert, tmp_path / "f", rank=4, include=["pooler"])
        assert "max_abs_diff" in res.output_check
        assert lg.level == logging.INFO
    finally:
        lg.setLevel(old)


# ----------------------------------------------------------------------------- finiteness, blockwise


def test_check_finite_is_blockwise(monkeypatch):
    from surgery.core import tensors
    from surgery.core.tensors import check_finite

    sizes = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: sizes.append(x.numel()) or real(x))
    t = torch.zeros(5 * tensors.BLOCK, dtype=torch.bfloat16)
    check_finite(t, "w", "m")  # passes
    t[-1] = float("inf")
    with pytest.raises(CheckpointError, match=r"w: 1 non-finite value\(s\) \(NaN/Inf\) in m"):
        check_finite(t, "w", "m")
    assert max(sizes) <= 4 * tensors.BLOCK
    # negative control: a full-size isfinite would have been seen
    sizes.clear()
    torch.isfinite(t).all()
    assert max(sizes) == t.numel()


@pytest.fixture
def nan_bert(tiny_bert, tmp_path):
    d = tmp_path / "nan-bert"
    d.mkdir()
    for p in tiny_bert.iterdir():
        if p.is_file() and p.name != "model.safetensors":
            (d / p.name).write_bytes(p.read_bytes())
    sd = load_file(tiny_bert / "model.safetensors")
    sd["pooler.dense.weight"] = sd["pooler.dense.weight"].clone()
    sd["pooler.dense.weight"][1, 2] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_every_tool_refuses_nan_weights_and_writes_nothing(nan_bert, tiny_bert, tmp_path):
    from surgery.ops.analyze import analyze
    from surgery.ops.bottleneck import init_adapter
    from surgery.ops.factorize import factorize
    from surgery.ops.init_lora import init_lora

    calls = {
        "analyze": lambda m, o: analyze(m, include=["pooler"]),
        "init-lora": lambda m, o: init_lora(m, o, rank=2, include=["pooler"]),
        "factorize": lambda m, o: factorize(m, o, rank=2, include=["pooler"], evaluate=False),
        "init-adapter": lambda m, o: init_adapter(m, o, bottleneck=2, modules="pooler"),
    }
    for name, call in calls.items():
        out = tmp_path / name
        with pytest.raises(CheckpointError, match=r"pooler\.dense\.weight: 1 non-finite"):
            call(nan_bert, out)
        assert not out.exists(), name
        call(tiny_bert, tmp_path / f"{name}-ok")  # control: the clean model goes through


# ----------------------------------------------------------------------------- CLI: fields become flags


@pytest.mark.parametrize("argv,flag", [
    (["analyze", "{m}", "--ranks", "8,0"], "--ranks"),
    (["analyze", "{m}", "--budget", "2x"], "--budget"),
    (["analyze", "{m}", "--device", "tpu"], "--device"),
    (["analyze", "{m}", "--threads", "0"], "--threads"),
    (["init-lora", "{m}", "-o", "{o}", "--rank", "2", "--alpha", "-1"], "--alpha"),
    (["init-lora", "{m}", "-o", "{o}", "--rank", "2", "--exclude", "[a-"], "--exclude"),
    (["init-adapter", "{m}", "-o", "{o}", "--bottleneck", "2", "--modules", "("], "--modules"),
    (["factorize", "{m}", "-o", "{o}"], "--rank"),
    (["factorize", "{m}", "-o", "{o}", "--energy", "0.9", "--min-savings", "-0.1"], "--min-savings"),
])
def test_cli_rule_errors_are_usage_errors_naming_the_flag(argv, flag, tiny_bert, tmp_path):
    r = CliRunner().invoke(cli, [a.format(m=tiny_bert, o=tmp_path / "out") for a in argv])
    assert r.exit_code == 2, r.output
    assert "Usage:" in r.output and flag in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_cli_quiet_keeps_the_summary_and_drops_the_report(tiny_bert, tmp_path):
    args = ["init-lora", str(tiny_bert), "--rank", "2", "--include", "pooler", "--device", "cpu", "--threads", "1"]
    loud = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "a")])
    quiet = CliRunner().invoke(cli, args + ["-o", str(tmp_path / "b"), "-q"])
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert "wrote" in loud.stdout and "wrote" in quiet.stdout
    assert "recon err" in loud.stderr and "recon err" not in quiet.stderr


def test_inspect_result_is_the_json_document(tiny_llama):
    from surgery.ops.inspect import inspect_checkpoint

    info = inspect_checkpoint(tiny_llama)
    r = CliRunner().invoke(cli, ["inspect", str(tiny_llama), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == json.loads(json.dumps(info.to_json()))
    assert list(info.to_json()) == ["path", "kind", "format", "shards", "tensor_count", "parameters", "bytes",
                                    "bytes_by_dtype", "config", "tied", "groups", "tensors",
                                    "what", "produced_by", "details"]  # what the directory is (#17)


# ----------------------------------------------------------------------------- shared helpers


def test_shared_layer_helpers(tiny_gpt2, tiny_llama):
    from surgery.core.layers import PROJECTION_KINDS, matrix_tensors, open_model, oriented, tied_head

    g = open_model(tiny_gpt2, "MODEL")
    proj = matrix_tensors(g, allowed=PROJECTION_KINDS)
    allm = matrix_tensors(g)
    assert set(proj) < set(allm) and "transformer.wte.weight" in allm and "transformer.wte.weight" not in proj
    w = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(oriented(w, "conv1d"), w.T) and torch.equal(oriented(w, "linear"), w)
    assert tied_head("lm_head.weight", {}) and not tied_head("lm_head.weight", {"tie_word_embeddings": False})
    assert not tied_head("model.layers.0.mlp.down_proj.weight", {})


def test_architecture_class_only_returns_model_classes(monkeypatch):
    import transformers

    from surgery.core.hf import architecture_class

    assert architecture_class(["BertModel"]) is transformers.BertModel
    monkeypatch.setattr(transformers, "pipeline", lambda *a, **k: None, raising=False)
    for archs in (["pipeline"], ["AutoConfig"], [5], None, "BertModel"):
        assert architecture_class(archs) is transformers.AutoModel, archs
