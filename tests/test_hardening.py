"""Hostile inputs through every command: pickles that carry code, remote-code configs,
index files that point outside the checkpoint, hostile adapter configs, non-finite
values; plus writer round trips as a property test.

Every command is driven through the real CLI (click's CliRunner, in process): a bad
input must end in exit code 1 with one line on stderr, never a traceback, and no
output. Pickle payloads would create a marker file if they ran: the marker must
never appear.
"""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from surgery.cli.main import cli
from surgery.errors import CheckpointError
from surgery.io import LazyReader, ShardedWriter, open_checkpoint
from surgery.io.safetensors_header import DTYPE_NAMES

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = set(cli.commands)


def run(args) -> CliRunner.Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_error(r, needle: str | None = None, code: int = 1) -> str:
    """Exit `code`, exactly one line on stderr starting with 'error:', no traceback, no internal error."""
    assert r.exit_code == code, f"exit {r.exit_code}: {r.output}"
    assert "Traceback" not in r.output, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "internal error" not in lines[0], lines[0]
    if needle is not None:
        assert re.search(needle, lines[0]), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- hostile builders


class _Payload:
    """Unpickling this runs code that writes `marker` (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def evil_model(dst: Path, src: Path, marker: Path) -> Path:
    """A model directory whose pytorch_model.bin carries code (real weights around it)."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    sd = dict(load_file(src / "model.safetensors"))
    sd["zz.payload"] = _Payload(marker)
    torch.save(sd, dst / "pytorch_model.bin")
    return dst


def evil_adapter(dst: Path, src: Path, marker: Path) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    sd = dict(load_file(src / "adapter_model.safetensors"))
    sd["payload"] = _Payload(marker)
    torch.save(sd, dst / "adapter_model.bin")
    return dst


def escaping_model(dst: Path, src: Path, how: str) -> Path:
    """A sharded model directory whose index names a shard outside the directory."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    outside = dst.parent / f"outside-{how}"
    outside.mkdir(exist_ok=True)
    shutil.copy(src / "model.safetensors", outside / "model.safetensors")
    names = list(load_file(src / "model.safetensors"))
    if how == "dotdot":
        shard = f"../{outside.name}/model.safetensors"
    elif how == "absolute":
        shard = str((outside / "model.safetensors").resolve())
    else:  # a symlink inside the directory that leads out of it
        (dst / "model-00001-of-00001.safetensors").symlink_to(outside / "model.safetensors")
        shard = "model-00001-of-00001.safetensors"
    index = {"metadata": {}, "weight_map": {n: shard for n in names}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def edited_model(dst: Path, src: Path, fn) -> Path:
    shutil.copytree(src, dst)
    sd = dict(load_file(src / "model.safetensors"))
    fn(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def edited_adapter(dst: Path, src: Path, config_fn=None, tensor_fn=None, raw_config: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if raw_config is not None:
        (dst / "adapter_config.json").write_text(raw_config)
    elif config_fn is not None:
        cfg = json.loads((src / "adapter_config.json").read_text())
        config_fn(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensor_fn is not None:
        sd = dict(load_file(src / "adapter_model.safetensors"))
        tensor_fn(sd)
        save_file(sd, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def _argv(cmd: str, model: Path, out: Path, ft: Path) -> list:
    """Minimal argv for each command taking one model (the hostile one)."""
    cal = out.parent / "cal.txt"
    cal.write_text("one sample\nanother sample\na third one\nand a fourth\n")
    return {
        "inspect": ["inspect", model],
        "extract-lora": ["extract-lora", model, ft, "-o", out, "--rank", "2", "-q"],
        "merge": ["merge", model, ROOT / "fixtures" / "tiny-bert-lora", "-o", out],
        "export-onnx": ["export-onnx", model, "-o", out, "--no-validate"],
        "analyze": ["analyze", model, "-q"],
        "init-lora": ["init-lora", model, "-o", out, "--rank", "2", "-q"],
        "init-adapter": ["init-adapter", model, "-o", out, "--bottleneck", "2", "-q"],
        "factorize": ["factorize", model, "-o", out, "--rank", "2"],
        "refine": ["refine", model, ROOT / "fixtures" / "tiny-bert-lora", "--teacher", ft, "-o", out,
                   "--calibration", cal, "--steps", "1", "-q"],
    }[cmd]


MODEL_COMMANDS = [c for c in ("inspect", "extract-lora", "merge", "export-onnx", "analyze", "init-lora",
                              "init-adapter", "factorize", "refine") if c in COMMANDS]


def _params(cmds):
    return list(cmds)


# ----------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("cmd", MODEL_COMMANDS)
def test_pickle_payload_never_runs(cmd, tiny_bert, tiny_bert_ft, tmp_path):
    """A .bin that carries code is refused by every command, and the code never runs."""
    marker = tmp_path / "PWNED"
    model = evil_model(tmp_path / "evil", tiny_bert, marker)
    r = run(_argv(cmd, model, tmp_path / "out", tiny_bert_ft))
    assert r.exit_code == 1, r.output
    assert not marker.exists(), f"{cmd} ran the pickle payload"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd", _params(MODEL_COMMANDS))
def test_pickle_payload_refused_with_clear_message(cmd, tiny_bert, tiny_bert_ft, tmp_path):
    marker = tmp_path / "PWNED"
    model = evil_model(tmp_path / "evil", tiny_bert, marker)
    assert_clean_error(run(_argv(cmd, model, tmp_path / "out", tiny_bert_ft)), "refused|code")
    assert not marker.exists()


def test_pickle_payload_as_fine_tune_and_as_adapter(tiny_bert, tiny_bert_lora, tmp_path):
    marker = tmp_path / "PWNED"
    ft = evil_model(tmp_path / "evil-ft", tiny_bert, marker)
    assert_clean_error(run(["extract-lora", tiny_bert, ft, "-o", tmp_path / "a", "--rank", "2", "-q"]), "refused")
    ad = evil_adapter(tmp_path / "evil-lora", tiny_bert_lora, marker)
    assert_clean_error(run(["merge", tiny_bert, ad, "-o", tmp_path / "m"]), "refused")
    assert_clean_error(run(["inspect", ad]), "refused")
    if "export-onnx" in COMMANDS:
        r = run(["export-onnx", tiny_bert, "-o", tmp_path / "x", "--adapter", ad, "--no-validate"])
        assert r.exit_code == 1 and "Traceback" not in r.output
    assert not marker.exists()
    assert not any((tmp_path / n).exists() for n in ("a", "m", "x"))


def test_payload_would_run_without_weights_only(tmp_path, tiny_bert):
    """Negative control: the payload is real: an unsafe torch.load runs it."""
    marker = tmp_path / "PWNED"
    model = evil_model(tmp_path / "evil", tiny_bert, marker)
    torch.load(model / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "pwned"


def test_plain_bin_still_loads(tiny_bert_bin, tiny_bert, tmp_path):
    """Control: a plain weights-only .bin passes the same gate (inspect and merge)."""
    assert run(["inspect", tiny_bert_bin]).exit_code == 0
    idx = open_checkpoint(tiny_bert_bin)
    assert idx.format == "torch" and len(idx.tensors) == len(open_checkpoint(tiny_bert).tensors)


# ----------------------------------------------------------------------------- remote code


def _sources() -> list[Path]:
    files = []
    for d in ("surgery", "bench", "fixtures"):
        files += [p for p in sorted((ROOT / d).rglob("*.py"))
                  if not any(part.startswith(".") or part in ("work", "site-packages")
                             for part in p.relative_to(ROOT).parts)]
    return files


def _unsafe_calls(source: str) -> list[str]:
    """Calls that could run checkpoint code: trust_remote_code not literally False, torch.load
    without weights_only=True, weights_only=False anywhere, pickle.load(s). Parsed, so comments
    and docstrings do not count."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        func = ast.unparse(node.func)
        where = f"line {node.lineno}: {ast.unparse(node)[:80]}"
        if "trust_remote_code" in kw and not (isinstance(kw["trust_remote_code"], ast.Constant)
                                              and kw["trust_remote_code"].value is False):
            found.append(where)
        if "weights_only" in kw and not (isinstance(kw["weights_only"], ast.Constant)
                                         and kw["weights_only"].value is True):
            found.append(where)
        if func in ("torch.load", "load") and func == "torch.load" and "weights_only" not in kw:
            found.append(where)
        if func in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
            found.append(where)
    return found


def test_no_remote_code_and_no_unsafe_loads_in_the_code_base():
    """No call enables trust_remote_code; every torch.load passes weights_only=True; no pickle.load."""
    files = _sources()
    offenders = [f"{p.relative_to(ROOT)} {c}" for p in files for c in _unsafe_calls(p.read_text(encoding="utf-8"))]
    assert not offenders, offenders
    assert len(files) > 10 and any(p.name == "index.py" for p in files)  # the scan saw the code base


@pytest.mark.parametrize("code,bad", [
    ("AutoModel.from_pretrained(p, trust_remote_code=True)", True),
    ("AutoModel.from_pretrained(p, trust_remote_code=flag)", True),
    ("torch.load(p)", True),
    ("torch.load(p, weights_only=False)", True),
    ("pickle.loads(b)", True),
    ("AutoConfig.from_pretrained(p, trust_remote_code=False, local_files_only=True)", False),
    ("torch.load(p, map_location='cpu', weights_only=True, mmap=True)", False),
    ("# torch.load(p, weights_only=False) in a comment\nx = 1", False),
])
def test_scan_negative_control(code, bad):
    assert bool(_unsafe_calls(code)) == bad


def _remote_code_model(dst: Path, src: Path, marker: Path) -> Path:
    """A model whose config asks for code shipped beside it; importing that code writes `marker`."""
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(cfg))
    payload = f"open({str(marker)!r}, 'w').write('pwned')\n"
    (dst / "modeling_evil.py").write_text(payload + "class EvilModel: pass\n")
    (dst / "configuration_evil.py").write_text(payload + "class EvilConfig: pass\n")
    return dst


@pytest.fixture
def no_dynamic_modules(monkeypatch):
    """Any attempt by transformers to import checkpoint code fails the test loudly."""
    import transformers.dynamic_module_utils as dmu

    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise AssertionError("transformers was asked to import code from the checkpoint")

    monkeypatch.setattr(dmu, "get_class_from_dynamic_module", refuse)
    return calls


def test_remote_code_config_never_runs_in_extract_merge(tiny_bert, tiny_bert_ft, tiny_bert_lora, tmp_path,
                                                         no_dynamic_modules):
    """extract/merge read config.json (surgery/modules.py builds the architecture on the meta
    device): with auto_map they fall back to name heuristics and never import the shipped code."""
    from surgery.core.layers import tensor_kinds

    marker = tmp_path / "PWNED"
    base = _remote_code_model(tmp_path / "base", tiny_bert, marker)
    kinds = tensor_kinds(open_checkpoint(base))
    assert kinds["encoder.layer.0.attention.self.query.weight"] == "linear"
    assert kinds["embeddings.word_embeddings.weight"] == "embedding"
    r = run(["extract-lora", base, tiny_bert_ft, "-o", tmp_path / "lora", "--rank", "2", "-q"])
    assert r.exit_code == 0, r.output
    r = run(["merge", base, tiny_bert_lora, "-o", tmp_path / "merged"])
    assert r.exit_code == 0, r.output
    assert not marker.exists() and not no_dynamic_modules


@pytest.mark.parametrize("cmd", [c for c in ("export-onnx", "demo") if c in COMMANDS])
def test_remote_code_config_refused_by_export(cmd, tiny_bert, tiny_bert_ft, tmp_path, no_dynamic_modules):
    marker = tmp_path / "PWNED"
    model = _remote_code_model(tmp_path / "model", tiny_bert, marker)
    if cmd == "export-onnx":
        line = assert_clean_error(run(["export-onnx", model, "-o", tmp_path / "out"]), "remote code")
        assert "auto_map" in line
        assert not (tmp_path / "out").exists()
    else:  # demo: the pipeline extracts and merges (copying the config) then refuses at export
        r = run(["demo", model, tiny_bert_ft, "--workdir", tmp_path / "demo", "--no-optimize"])
        assert_clean_error(r, "remote code")
    assert not marker.exists() and not no_dynamic_modules


def test_meta_model_never_trusts_remote_code(monkeypatch):
    """modules._meta_model with a config naming an unknown model type and custom code returns None."""
    from surgery.core.layers import _meta_model

    assert _meta_model({"model_type": "evil-custom", "auto_map": {"AutoModel": "x.Y"}}) is None
    assert _meta_model({"model_type": "evil-custom", "architectures": ["EvilModel"]}) is None
    # control: a config transformers ships builds (on the meta device, no memory)
    m = _meta_model({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 16, "vocab_size": 10, "architectures": ["BertModel"]})
    assert m is not None and next(m.parameters()).device.type == "meta"
    # `architectures` names a class transformers ships, never any other attribute it happens to have
    import transformers

    called = []
    monkeypatch.setattr(transformers, "pipeline", lambda *a, **k: called.append(a), raising=False)
    cfg = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 16, "vocab_size": 10}
    for arch in (["pipeline"], [5], [None]):
        _meta_model({**cfg, "architectures": arch})
    assert not called


# ----------------------------------------------------------------------------- index escapes


def _escape_cases():
    for cmd in MODEL_COMMANDS:
        # export-onnx is slow and fails the same way for all three: one case keeps it covered
        for how in ["dotdot"] if cmd == "export-onnx" else ["dotdot", "absolute", "symlink"]:
            yield pytest.param(cmd, how, id=f"{cmd}-{how}")


@pytest.mark.parametrize("cmd,how", list(_escape_cases()))
def test_index_shard_outside_directory_refused(cmd, how, tiny_bert, tiny_bert_ft, tmp_path):
    model = escaping_model(tmp_path / "model", tiny_bert, how)
    assert_clean_error(run(_argv(cmd, model, tmp_path / "out", tiny_bert_ft)), "outside the checkpoint directory")
    assert not (tmp_path / "out").exists()


def test_index_escape_negative_control(tiny_bert, tmp_path):
    """The same index with the shard inside the directory is accepted."""
    model = escaping_model(tmp_path / "model", tiny_bert, "dotdot")
    shutil.copy(tiny_bert / "model.safetensors", model / "model-00001-of-00001.safetensors")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "model-00001-of-00001.safetensors" for k in index["weight_map"]}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert run(["inspect", model]).exit_code == 0


# ----------------------------------------------------------------------------- adapter configs


def _set(**kv):
    return lambda cfg: cfg.update(kv)


def _drop(key):
    return lambda cfg: cfg.pop(key)


ADAPTER_CONFIGS = {
    "r-zero": (_set(r=0), "r must be a positive integer"),
    "r-negative": (_set(r=-4), "r must be a positive integer"),
    "r-string": (_set(r="4"), "r must be a positive integer"),
    "r-bool": (_set(r=True), "r must be a positive integer"),
    "r-float": (_set(r=4.0), "r must be a positive integer"),
    "alpha-string": (_set(lora_alpha="8"), "lora_alpha must be a finite number"),
    "alpha-nan": (_set(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    "alpha-inf": (_set(lora_alpha=float("inf")), "lora_alpha must be a finite number"),
    "peft-type-unknown": (_set(peft_type="IA3"), "unsupported adapter type"),
    "peft-type-number": (_set(peft_type=7), "unsupported adapter type"),
    "peft-type-missing": (_drop("peft_type"), "no peft_type"),
    "target-bad-regex": (_set(target_modules="(query|key"), "not a valid regular expression"),
    "target-wrong-type": (_set(target_modules=5), "target_modules must be"),
    "target-list-of-ints": (_set(target_modules=[1, 2]), "target_modules must be"),
    "rank-pattern-bad-regex": (_set(rank_pattern={"query[": 4}), "not a valid regular expression"),
    "rank-pattern-zero": (_set(rank_pattern={"query": 0}), "rank_pattern"),
    "rank-pattern-list": (_set(rank_pattern=["query"]), "rank_pattern must be"),
    "alpha-pattern-string": (_set(alpha_pattern={"query": "x"}), "alpha_pattern"),
    "exclude-bad-regex": (_set(exclude_modules="*"), "not a valid regular expression"),
    "modules-to-save-string": (_set(modules_to_save="classifier"), "modules_to_save must be"),
    "modules-to-save-bad-regex": (_set(modules_to_save=["cls("]), "not a valid regular expression"),
    "use-dora-string": (_set(use_dora="yes"), "use_dora must be true or false"),
    "fan-in-fan-out-int": (_set(fan_in_fan_out=1), "fan_in_fan_out must be true or false"),
    "bias-bogus": (_set(bias="some"), "bias must be"),
    "layers-to-transform-string": (_set(layers_to_transform="0"), "layers_to_transform must be"),
    "layers-pattern-bad-regex": (_set(layers_pattern="layer(", layers_to_transform=[0]),
                                 "not a valid regular expression"),
    "rank-mismatch": (_set(r=2), "rank 4 in the weights"),
}
RAW_CONFIGS = {
    "not-json": ("{r: 4,", "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "a-list": ("[1, 2]", "expected a JSON object"),
    "not-utf8": ("\udcff", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(ADAPTER_CONFIGS))
def test_hostile_adapter_config_through_merge_cli(case, tiny_bert, tiny_bert_lora, tmp_path):
    fn, needle = ADAPTER_CONFIGS[case]
    ad = edited_adapter(tmp_path / "ad", tiny_bert_lora, config_fn=fn)
    line = assert_clean_error(run(["merge", tiny_bert, ad, "-o", tmp_path / "m"]), re.escape(needle))
    assert "adapter_config.json" in line  # names the file
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("case", sorted(RAW_CONFIGS))
def test_unparseable_adapter_config_through_merge_cli(case, tiny_bert, tiny_bert_lora, tmp_path):
    raw, needle = RAW_CONFIGS[case]
    ad = tmp_path / "ad"
    shutil.copytree(tiny_bert_lora, ad)
    (ad / "adapter_config.json").write_bytes(raw.encode("utf-8", "surrogateescape"))
    assert_clean_error(run(["merge", tiny_bert, ad, "-o", tmp_path / "m"]), re.escape(needle))
    assert_clean_error(run(["inspect", ad]))
    assert not (tmp_path / "m").exists()


def test_adapter_config_control_merges(tiny_bert, tiny_bert_lora, tmp_path):
    """Control: the unedited copy merges (the edits above are what is refused)."""
    ad = edited_adapter(tmp_path / "ad", tiny_bert_lora, config_fn=lambda cfg: None)
    assert run(["merge", tiny_bert, ad, "-o", tmp_path / "m"]).exit_code == 0


# ----------------------------------------------------------------------------- non-finite values


Q = "encoder.layer.0.attention.self.query.weight"
QB = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"


def _poke(name, value, dtype=None):
    def fn(sd):
        t = sd[name].clone() if dtype is None else sd[name].to(dtype)
        t.view(-1)[3] = value
        sd[name] = t
    return fn


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_named_by_extract(value, tiny_bert, tiny_bert_ft, tmp_path):
    base = edited_model(tmp_path / "base", tiny_bert, _poke(Q, value))
    line = assert_clean_error(run(["extract-lora", base, tiny_bert_ft, "-o", tmp_path / "a", "--rank", "2", "-q"]))
    assert Q in line and "non-finite" in line
    ft = edited_model(tmp_path / "ft", tiny_bert_ft, _poke(Q, value))
    line = assert_clean_error(run(["extract-lora", tiny_bert, ft, "-o", tmp_path / "a", "--rank", "2", "-q"]))
    assert Q in line and "non-finite" in line
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("where", ["adapter", "base-touched", "base-untouched"])
def test_merge_refuses_non_finite(where, tiny_bert, tiny_bert_lora, tmp_path):
    name = {"adapter": Q, "base-touched": Q, "base-untouched": "embeddings.LayerNorm.weight"}[where]
    base, ad = tiny_bert, tiny_bert_lora
    if where == "adapter":
        ad = edited_adapter(tmp_path / "ad", tiny_bert_lora, tensor_fn=_poke(QB, float("nan")))
    else:
        base = edited_model(tmp_path / "base", tiny_bert, _poke(name, float("inf")))
    line = assert_clean_error(run(["merge", base, ad, "-o", tmp_path / "m"]), "non-finite")
    assert name in line
    assert ("base" in line) == (where != "adapter")
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.surgery-tmp-*"))


def test_merge_refuses_overflow_from_weight_and_dtype(tiny_bert, tiny_bert_lora, tiny_llama, tiny_llama_lora, tmp_path):
    # a huge adapter weight overflows
    line = assert_clean_error(run(["merge", tiny_llama, tiny_llama_lora, "-o", tmp_path / "m", "--weight", "1e300"]),
                              "non-finite")
    assert "tiny-llama-lora" in line
    # an untouched fp32 tensor too large for fp16 overflows the --dtype cast
    base = edited_model(tmp_path / "base", tiny_bert, _poke("pooler.dense.bias", 1e6))
    line = assert_clean_error(run(["merge", base, tiny_bert_lora, "-o", tmp_path / "m",
                                   "--dtype", "fp16"]), "overflows")
    assert "pooler.dense.bias" in line
    assert not (tmp_path / "m").exists()
    # control: the same merge in bf16 (range of fp32) succeeds
    assert run(["merge", base, tiny_bert_lora, "-o", tmp_path / "m",
                "--dtype", "bf16"]).exit_code == 0


# ----------------------------------------------------------------------------- writer property


_DTYPES = sorted(DTYPE_NAMES, key=str)


@st.composite
def _tensor(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    n = math.prod(shape)
    item = torch.empty((), dtype=dtype).element_size()
    raw = draw(st.binary(min_size=n * item, max_size=n * item))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        return (t % 2).to(torch.bool).reshape(shape)
    return t.view(dtype).reshape(shape)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=st.lists(_tensor(), min_size=0, max_size=8),
       shard=st.one_of(st.none(), st.integers(1, 400)))
def test_property_writer_round_trip(tensors, shard):
    """Any sequence of tensors (every dtype, 0-d and empty) at any shard size reads back bit-exactly."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        src = {f"t{i}.w": t for i, t in enumerate(tensors)}
        with ShardedWriter(out, shard_size=shard) as w:
            for k, v in src.items():
                w.add(k, v)
        idx = open_checkpoint(out)
        assert list(idx.tensors) == list(src)
        with LazyReader(idx) as r:
            for k, v in src.items():
                got = r.get(k)
                assert got.dtype == v.dtype and got.shape == v.shape
                # bytes, not values: NaN payloads and float8 patterns must survive too
                assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
        if shard is not None:
            nbytes = [v.numel() * v.element_size() for v in src.values()]
            assert all(s.stat().st_size > 0 for s in idx.shards)
            assert len(idx.shards) <= max(1, len([b for b in nbytes if b]))
        assert [p.name for p in Path(d).iterdir()] == ["out"]  # no temp dir left


def test_writer_round_trip_negative_control(tmp_path):
    """The byte comparison above sees a one-bit change."""
    t = torch.zeros(3, dtype=torch.float16)
    with ShardedWriter(tmp_path / "out") as w:
        w.add("t", t)
    with LazyReader(open_checkpoint(tmp_path / "out")) as r:
        got = r.get("t").clone()
    got.view(torch.uint8)[0] ^= 1
    assert not torch.equal(got.view(torch.uint8), t.view(torch.uint8))


def test_corrupt_checkpoint_is_checkpoint_error(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError):
        open_checkpoint(p)
