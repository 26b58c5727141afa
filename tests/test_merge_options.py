"""MergeOptions: every rule names its field, values are normalised once, and it stays torch-free."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from surgery.errors import OptionError
from surgery.options.base import parse_size
from surgery.options.merge import MergeOptions


def test_defaults():
    o = MergeOptions()
    assert (o.weights, o.unmerge, o.dtype, o.shard_size, o.device, o.threads, o.overwrite) == \
        ((), False, None, None, "auto", None, False)
    assert o.weight_list(3) == [1.0, 1.0, 1.0]


def test_normalised_values():
    o = MergeOptions(weights=[1, -0.5], shard_size="5GB", dtype="bf16", device="cuda:1", threads=2)
    assert o.weights == (1.0, -0.5) and all(type(w) is float for w in o.weights)
    assert o.shard_size == 5_000_000_000 and MergeOptions(shard_size=123).shard_size == 123
    assert MergeOptions(weights=None).weights == ()
    assert o.to_json()["weights"] == [1.0, -0.5]
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.unmerge = True  # type: ignore[misc]


def test_torch_dtype_is_accepted_as_its_short_name():
    torch = pytest.importorskip("torch")
    assert MergeOptions(dtype=torch.bfloat16).dtype == "bf16"
    assert MergeOptions(dtype=torch.float32).dtype == "fp32"
    with pytest.raises(OptionError) as e:
        MergeOptions(dtype=torch.int8)
    assert e.value.field == "dtype"


@pytest.mark.parametrize("fields,field", [
    ({"weights": [math.nan]}, "weights"),
    ({"weights": [1.0, math.inf]}, "weights"),
    ({"weights": ["1"]}, "weights"),
    ({"weights": [True]}, "weights"),
    ({"weights": "1,2"}, "weights"),
    ({"weights": 1.0}, "weights"),
    ({"dtype": "int4"}, "dtype"),
    ({"dtype": "float32"}, "dtype"),
    ({"shard_size": "5XB"}, "shard_size"),
    ({"shard_size": "-1"}, "shard_size"),
    ({"shard_size": 0}, "shard_size"),
    ({"device": "tpu"}, "device"),
    ({"device": "cuda:x"}, "device"),
    ({"threads": 0}, "threads"),
    ({"threads": 1.5}, "threads"),
    ({"unmerge": "yes"}, "unmerge"),
    ({"overwrite": 1}, "overwrite"),
])
def test_each_rule_names_its_field(fields, field):
    with pytest.raises(OptionError) as e:
        MergeOptions(**fields)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ")
    assert "--" not in str(e.value)  # the library names fields, never flags


def test_valid_values_pass():  # control for the table above
    for fields in ({"weights": [0.0, -2, 1e3]}, {"dtype": "fp16"}, {"shard_size": "2GiB"}, {"device": "cpu"},
                   {"device": "cuda"}, {"device": "cuda:0"}, {"threads": 1}, {"unmerge": True}):
        MergeOptions(**fields)


def test_adapter_count_rules():
    o = MergeOptions(weights=[0.5, 0.5])
    o.check_adapters(2)
    assert o.weight_list(2) == [0.5, 0.5]
    with pytest.raises(OptionError, match="2 weight.*3 adapter") as e:
        o.check_adapters(3)
    assert e.value.field == "weights"
    with pytest.raises(OptionError) as e:
        MergeOptions().check_adapters(0)
    assert e.value.field == "adapters"
    with pytest.raises(OptionError) as e:
        MergeOptions.for_adapters(["a"], weights=[1, 2])
    assert e.value.field == "weights"
    assert MergeOptions.for_adapters(["a", "b"], weights=[1, 2]).weights == (1.0, 2.0)
    assert MergeOptions.for_adapters(["a", "b"]).weight_list(2) == [1.0, 1.0]


def test_replace_revalidates():
    o = MergeOptions(dtype="bf16")
    assert o.replace(unmerge=True).unmerge and o.replace(unmerge=True).dtype == "bf16"
    with pytest.raises(OptionError):
        o.replace(threads=-1)


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("2KiB", 2048), ("1000", 1000), (" 1.5 mb ", 1_500_000),
                                           (7, 7)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5XB", "", "-1", "0", "GB", True, 0])
def test_parse_size_rejects(text):
    with pytest.raises(OptionError, match="invalid size"):
        parse_size(text)


def test_options_and_size_parser_do_not_import_torch():
    code = ("import sys; import surgery.options.merge, surgery.options.base; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_io_reuses_the_one_size_parser():
    from surgery import io

    assert io.parse_size is parse_size


@pytest.mark.parametrize("extra,needle", [
    (["--weight", "1", "--weight", "2"], "--weight: 2 weight(s) for 1 adapter(s)"),
    (["--weight", "inf"], "--weight: must be a finite number"),
    (["--shard-size", "5XB"], "--shard-size: invalid size '5XB'"),
    (["--device", "tpu"], "--device: must be one of"),
])
def test_cli_names_the_flag_of_the_field(extra, needle, tmp_path):
    """build_options turns the field an OptionError names into the command's own flag (exit 2)."""
    from pathlib import Path

    from click.testing import CliRunner

    from surgery.cli.main import cli

    fix = Path(__file__).resolve().parents[1] / "fixtures"
    r = CliRunner().invoke(cli, ["merge", str(fix / "tiny-bert"), str(fix / "tiny-bert-lora"), "-o",
                                 str(tmp_path / "m"), *extra])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "m").exists()
