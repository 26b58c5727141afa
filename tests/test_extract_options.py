"""ExtractOptions: every extract-lora rule, checked once, naming its field (library) or flag (CLI).

Also the plan phase of surgery.ops.extract: conflicts (PEFT's lora_bias vs an Embedding LoRA)
are settled from the headers and bias vectors before any SVD.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from surgery.errors import OptionError
from surgery.options.extract import DEFAULT_MAX_RANK, DEFAULT_RANK, ExtractOptions, parse_budget

ROOT = Path(__file__).resolve().parents[1]

# (fields, the field at fault): one case per rule
BAD = [
    ({"rank": 0}, "rank"), ({"rank": -3}, "rank"), ({"rank": 2.5}, "rank"), ({"rank": True}, "rank"),
    ({"rank": "4"}, "rank"),
    ({"energy": 0.0}, "energy"), ({"energy": 1.5}, "energy"), ({"energy": -0.1}, "energy"),
    ({"energy": math.nan}, "energy"), ({"energy": math.inf}, "energy"), ({"energy": "0.9"}, "energy"),
    ({"budget": "abc"}, "budget"), ({"budget": "-5"}, "budget"), ({"budget": "0%"}, "budget"),
    ({"budget": "101%"}, "budget"), ({"budget": "nan"}, "budget"), ({"budget": "inf"}, "budget"),
    ({"budget": "1.5"}, "budget"), ({"budget": -1}, "budget"), ({"budget": 2.5}, "budget"),
    ({"max_rank": 0}, "max_rank"), ({"max_rank": 1.0}, "max_rank"),
    ({"svd": "qr"}, "svd"), ({"niter": -1}, "niter"), ({"niter": 1.5}, "niter"),
    ({"seed": "x"}, "seed"), ({"seed": True}, "seed"), ({"seed": 2**64}, "seed"),
    ({"include": ["("]}, "include"), ({"exclude": ["[a-"]}, "exclude"), ({"include": 5}, "include"),
    ({"include": [3]}, "include"),
    ({"embeddings": "tied"}, "embeddings"), ({"other_deltas": "keep"}, "other_deltas"), ({"bias": "full"}, "bias"),
    ({"serving_safe": "yes"}, "serving_safe"), ({"overwrite": 1}, "overwrite"),
    ({"dtype": "int8"}, "dtype"), ({"dtype": "float32"}, "dtype"),
    ({"device": "tpu"}, "device"), ({"device": "cuda:x"}, "device"), ({"device": ""}, "device"),
    ({"threads": 0}, "threads"), ({"task_type": "causal_lm"}, "task_type"),
    # conflicting options
    ({"rank": 4, "energy": 0.9}, "energy"), ({"rank": 4, "budget": "1%"}, "budget"),
    ({"energy": 0.9, "budget": "1%"}, "budget"),
    ({"serving_safe": True, "embeddings": "full"}, "serving_safe"),
    ({"serving_safe": True, "other_deltas": "full"}, "serving_safe"),
]


@pytest.mark.parametrize("fields,field", BAD, ids=lambda v: v if isinstance(v, str) else repr(v))
def test_bad_value_names_its_field(fields, field):
    with pytest.raises(OptionError) as e:
        ExtractOptions(**fields)
    assert e.value.field == field
    msg = str(e.value)
    assert msg.startswith(f"{field}: ") and "--" not in msg, msg  # fields, never CLI flags
    assert "\n" not in msg


GOOD = [
    {}, {"rank": 1}, {"energy": 1.0}, {"energy": 1}, {"energy": 1e-9}, {"budget": "1%"}, {"budget": "100%"},
    {"budget": "2e6"}, {"budget": 150000}, {"budget": 0}, {"max_rank": 64, "energy": 0.5}, {"svd": "exact"},
    {"niter": 0}, {"seed": -1}, {"include": ["attn", "mlp"]}, {"exclude": "lm_head"},
    {"embeddings": "skip"}, {"other_deltas": "skip"}, {"bias": "skip"}, {"serving_safe": True},
    {"serving_safe": True, "other_deltas": "skip", "embeddings": "lora"}, {"dtype": "bf16"},
    {"device": "cpu"}, {"device": "cuda"}, {"device": "cuda:1"}, {"threads": 2}, {"task_type": "CAUSAL_LM"},
    {"overwrite": True},
]


@pytest.mark.parametrize("fields", GOOD, ids=repr)
def test_good_values_pass(fields):
    # negative control of the table above: the same fields with valid values are accepted
    opts = ExtractOptions(**fields)
    assert json.loads(json.dumps(opts.to_json()))  # JSON-able


def test_derived_values():
    assert ExtractOptions().effective_rank == DEFAULT_RANK and ExtractOptions().rank_policy == "rank"
    assert ExtractOptions(rank=8, max_rank=4).rank_cap == 4
    assert ExtractOptions(rank=8).rank_cap == 8
    assert ExtractOptions(energy=0.9).effective_rank is None
    assert ExtractOptions(energy=0.9).rank_cap == DEFAULT_MAX_RANK
    assert ExtractOptions(energy=0.9, svd="exact").rank_cap is None
    assert ExtractOptions(budget="1%", max_rank=7).rank_cap == 7
    assert ExtractOptions().effective_other_deltas == "full"
    assert ExtractOptions(serving_safe=True).effective_other_deltas == "skip"
    assert ExtractOptions(include=["a", "b"]).include == ("a", "b")
    assert ExtractOptions(include="a").include == ("a",)


def test_frozen_and_replace_validates():
    opts = ExtractOptions(rank=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.rank = 0  # type: ignore[misc]
    assert opts.replace(rank=8).rank == 8 and opts.rank == 4
    with pytest.raises(OptionError) as e:
        opts.replace(rank=0)
    assert e.value.field == "rank"


def test_parse_budget_is_torch_free_and_shared():
    code = "import sys, surgery.options.extract; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from surgery.core import lowrank

    assert lowrank.parse_budget is parse_budget  # one parser: the SVD engine re-exports it
    assert parse_budget("2%", 1000) == 20 and parse_budget("1e3") == 1000
    with pytest.raises(OptionError) as e:
        parse_budget("2%", None)
    assert e.value.field == "budget"


# ----------------------------------------------------------------------------- library entry point


def test_extract_lora_checks_options_before_any_io(tmp_path):
    from surgery.ops.extract import extract_lora

    missing = tmp_path / "no-such-model"
    with pytest.raises(OptionError) as e:  # the options fail first: the inputs are not even opened
        extract_lora(missing, missing, tmp_path / "ad", rank=0)
    assert e.value.field == "rank" and not (tmp_path / "ad").exists()
    with pytest.raises(OptionError) as e:  # fields replace those of an options object, and are checked
        extract_lora(missing, missing, tmp_path / "ad", ExtractOptions(rank=4), energy=0.5)
    assert e.value.field == "energy"
    with pytest.raises(TypeError):
        extract_lora(missing, missing, tmp_path / "ad", {"rank": 4})


def test_options_object_and_fields_give_the_same_bytes(tiny_bert, tiny_bert_ft, tmp_path):
    from surgery.ops.extract import extract_lora

    a = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "a", rank=3, bias="skip", seed=5)
    b = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "b", ExtractOptions(rank=2, bias="skip"), rank=3, seed=5)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (a.out / f).read_bytes() == (b.out / f).read_bytes()
    assert a.options == b.options and a.options["device"] == "cpu" and a.options["rank"] == 3
    # negative control: another rank writes other bytes
    c = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "c", rank=2, bias="skip", seed=5)
    assert (c.out / "adapter_model.safetensors").read_bytes() != (a.out / "adapter_model.safetensors").read_bytes()


def test_threads_are_restored(tiny_bert, tiny_bert_ft, tmp_path):
    from surgery.ops.extract import extract_lora

    before = torch.get_num_threads()
    extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", rank=2, threads=before + 1)
    assert torch.get_num_threads() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_one_error(tiny_bert, tiny_bert_ft, tmp_path):
    from surgery.ops.extract import extract_lora

    with pytest.raises(OptionError, match="CUDA is not available"):
        extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", rank=2, device="cuda")
    assert not (tmp_path / "ad").exists()
    assert extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", rank=2, device="auto").options["device"] == "cpu"


# ----------------------------------------------------------------------------- plan: conflicts settled first


def _plan(base, ft, **fields):
    from surgery.io import LazyReader, open_checkpoint
    from surgery.ops.extract import _Pair, plan_extraction

    bi, fi = open_checkpoint(base), open_checkpoint(ft)
    with LazyReader(bi) as rb, LazyReader(fi) as rf:
        plan = plan_extraction(_Pair(bi, fi, rb, rf), ExtractOptions(**fields))
    return {p.name: p for p in plan.tensors}


EMB = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")


def test_plan_settles_lora_bias_against_embedding_lora(tiny_bert, tiny_bert_ft, tmp_path):
    plan = _plan(tiny_bert, tiny_bert_ft, rank=4, bias="lora")  # bias + embedding deltas: embeddings saved whole
    assert all(plan[e].action == "full" and plan[e].instead_of_lora for e in EMB)
    assert plan["encoder.layer.0.attention.self.query.bias"].action == "bias"
    plan = _plan(tiny_bert, tiny_bert_ft, rank=4, bias="skip")  # biases dropped, embeddings stay LoRA
    assert all(plan[e].action == "lora" for e in EMB)
    assert plan["encoder.layer.0.attention.self.query.bias"].action == "skip"
    plan = _plan(tiny_bert, tiny_bert_ft, rank=4, bias="lora", serving_safe=True)  # nothing whole: biases dropped
    assert all(plan[e].action == "lora" for e in EMB)
    assert "PEFT cannot combine" in plan["encoder.layer.0.attention.self.query.bias"].why
    # Negative control: a fine-tune whose biases did not change has no conflict.
    base, ft = load_file(tiny_bert / "model.safetensors"), load_file(tiny_bert_ft / "model.safetensors")
    same_bias = {k: (base[k] if k.endswith(".bias") else v) for k, v in ft.items()}
    (tmp_path / "ft").mkdir()
    save_file(same_bias, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "ft" / "config.json").write_text((tiny_bert_ft / "config.json").read_text())
    plan = _plan(tiny_bert, tmp_path / "ft", rank=4, bias="lora")
    assert all(plan[e].action == "lora" for e in EMB)


def test_budget_is_not_spent_on_embeddings_saved_whole(tiny_bert, tiny_bert_ft, tmp_path):
    """The conflict is settled before the budget pass, so the budget goes to the LoRA modules."""
    from surgery.ops.extract import extract_lora

    res = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "ad", budget="3000", svd="exact", bias="lora")
    assert set(EMB) <= set(res.full) and {m.kind for m in res.modules} == {"linear"}
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    lora = sum(v.numel() for k, v in sd.items() if ".lora_A." in k or ".lora_B.weight" in k)
    assert lora == sum(m.params for m in res.modules) <= 3000
    assert 3000 - lora < 64  # the cheapest step of a 32x32 linear: nothing left unspent
    # (before the plan settled it first, the embeddings took 728 of the 3000 and were then dropped)


# ----------------------------------------------------------------------------- CLI: exit 2 naming the flag


def run_cli(args):
    from surgery.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


CLI_BAD = [
    (["--rank", "0"], "--rank"), (["--rank", "x"], "--rank"), (["--energy", "1.5"], "--energy"),
    (["--energy", "nan"], "--energy"), (["--energy", "inf"], "--energy"), (["--budget", "abc"], "--budget"),
    (["--budget", "0%"], "--budget"), (["--max-rank", "0"], "--max-rank"), (["--svd", "qr"], "--svd"),
    (["--niter", "-1"], "--niter"), (["--seed", "x"], "--seed"), (["--include", "("], "--include"),
    (["--exclude", "[a-"], "--exclude"), (["--embeddings", "tied"], "--embeddings"),
    (["--other-deltas", "keep"], "--other-deltas"), (["--bias", "full"], "--bias"),
    (["--dtype", "int8"], "--dtype"), (["--device", "tpu"], "--device"), (["--threads", "0"], "--threads"),
    (["--task-type", "causal_lm"], "--task-type"),
    (["--rank", "4", "--budget", "1%"], "--budget"), (["--energy", "0.5", "--budget", "1%"], "--budget"),
    (["--serving-safe", "--embeddings", "full"], "--serving-safe"),
    (["--serving-safe", "--other-deltas", "full"], "--serving-safe"),
]


@pytest.mark.parametrize("args,flag", CLI_BAD, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_cli_bad_option_exit_2_names_the_flag(tiny_bert, tiny_bert_ft, tmp_path, args, flag):
    r = run_cli(["extract-lora", tiny_bert, tiny_bert_ft, "-o", tmp_path / "ad", *args])
    assert r.exit_code == 2, r.output
    assert flag in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "ad").exists()


def test_cli_serving_safe_is_the_library_option(tiny_gpt2, tiny_gpt2_ft, tmp_path):
    r = run_cli(["extract-lora", tiny_gpt2, tiny_gpt2_ft, "-o", tmp_path / "ad", "--rank", "2", "--serving-safe",
                 "--json", "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["options"]["other_deltas"] == "skip" and not data["full"]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None
    # negative control: without it, norms (and embeddings beside lora_bias) are saved whole
    r = run_cli(["extract-lora", tiny_gpt2, tiny_gpt2_ft, "-o", tmp_path / "ad2", "--rank", "2", "--json", "-q"])
    assert json.loads(r.stdout)["full"] and json.loads((tmp_path / "ad2" / "adapter_config.json").read_text())[
        "modules_to_save"]


def test_cli_module_imports_nothing_heavy_at_top():
    tree = ast.parse((ROOT / "surgery" / "cli" / "commands" / "extract_cmd.py").read_text())
    heavy = ("torch", "transformers", "surgery.ops", "surgery.core", "surgery.onnx")
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert names and not [m for m in names if m.startswith(heavy)], names
