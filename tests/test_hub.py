"""Inputs given as Hugging Face Hub ids: surgery.io.hub.resolve_model and extract-lora BASE / FT.

No network: a temporary directory laid out as the Hub cache (HF_HUB_CACHE) holds
models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/main},
exactly as huggingface_hub writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgery.errors import CheckpointError
from surgery.io.hub import hub_cache_dir, is_hub_id, resolve_model

MAIN = "a" * 40
OTHER = "b" * 40


def add_to_cache(cache: Path, repo: str, src: Path, commit: str = MAIN, ref: str | None = "main") -> Path:
    """Put the files of `src` into the Hub cache layout for `repo` at `commit` (symlinks into blobs)."""
    d = cache / ("models--" + repo.replace("/", "--"))
    (d / "blobs").mkdir(parents=True, exist_ok=True)
    (d / "refs").mkdir(exist_ok=True)
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(Path(src).iterdir()):
        if f.is_file():
            h = hashlib.sha256(f.read_bytes()).hexdigest()
            if not (d / "blobs" / h).exists():
                shutil.copy(f, d / "blobs" / h)
            os.symlink(f"../../blobs/{h}", snap / f.name)
    if ref is not None:
        (d / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    c = tmp_path / "hub"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return c


def test_local_path_is_returned_as_is(tiny_bert, cache, monkeypatch):
    assert resolve_model(tiny_bert) == Path(tiny_bert)
    assert resolve_model(str(tiny_bert)) == Path(tiny_bert)
    assert not is_hub_id(str(tiny_bert)) and not is_hub_id(Path("org/name"))
    # A relative path that exists wins over the Hub id it looks like.
    (cache / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(cache)
    assert resolve_model("org/name") == Path("org/name")


def test_cached_id_resolves_to_its_snapshot(tiny_bert, cache):
    snap = add_to_cache(cache, "org/tiny", tiny_bert)
    assert hub_cache_dir() == cache
    assert is_hub_id("org/tiny")
    assert resolve_model("org/tiny") == snap
    assert resolve_model("org/tiny", revision=MAIN) == snap
    assert (resolve_model("org/tiny") / "config.json").is_symlink()  # files are links into blobs/


def test_revision_selects_the_snapshot(tiny_bert, tiny_bert_ft, cache):
    main = add_to_cache(cache, "org/tiny", tiny_bert)
    other = add_to_cache(cache, "org/tiny", tiny_bert_ft, commit=OTHER, ref="v2")
    assert resolve_model("org/tiny") == main
    assert resolve_model("org/tiny", revision="v2") == other
    assert resolve_model("org/tiny", revision=OTHER) == other
    with pytest.raises(CheckpointError, match="at revision v3"):
        resolve_model("org/tiny", revision="v3")


def test_missing_id_is_one_line_with_the_download_command(cache):
    with pytest.raises(CheckpointError) as e:
        resolve_model("org/absent")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("org/absent is not in the Hugging Face cache (HF_HUB_OFFLINE=1")
    assert "`huggingface-cli download org/absent`" in msg and str(cache) in msg


def test_extract_lora_from_hub_ids(tiny_bert, tiny_bert_ft, cache, tmp_path):
    from surgery.ops.extract import extract_lora

    add_to_cache(cache, "org/base", tiny_bert)
    add_to_cache(cache, "org/ft", tiny_bert_ft, commit=OTHER)
    res = extract_lora("org/base", "org/ft", tmp_path / "ad", rank=4)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/base" and cfg["revision"] is None
    # The same adapter as from the local directories, bit for bit (apart from the base's name).
    ref = extract_lora(tiny_bert, tiny_bert_ft, tmp_path / "local", rank=4)
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "local" / "adapter_model.safetensors").read_bytes()
    assert [m.module for m in res.modules] == [m.module for m in ref.modules]
    # Negative control: an id not in the cache is refused before anything is written.
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        extract_lora("org/base", "org/absent", tmp_path / "none", rank=4)
    assert not (tmp_path / "none").exists()


def test_cli_revision_and_missing_id(tiny_bert, tiny_bert_ft, cache, tmp_path):
    from surgery.cli.main import cli

    add_to_cache(cache, "org/base", tiny_bert, commit=OTHER, ref="v1")
    add_to_cache(cache, "org/ft", tiny_bert_ft, commit=OTHER, ref="v1")
    r = CliRunner().invoke(cli, ["extract-lora", "org/base", "org/ft", "-o", str(tmp_path / "ad"), "--rank", "2",
                                 "--revision", "v1", "-q"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/base" and cfg["revision"] == "v1"
    # Without the revision, main is not in the cache: one line, exit 1, the fix in it.
    r = CliRunner().invoke(cli, ["extract-lora", "org/base", "org/ft", "-o", str(tmp_path / "ad2"), "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1 and "huggingface-cli download org/base" in r.stderr
