"""Sentence-transformers pooling inside the exported graph: the ONNX returns the sentence embedding.

A sentence-transformers directory holds modules.json (Transformer -> Pooling [-> Normalize]) and
1_Pooling/config.json (pooling_mode_mean_tokens / pooling_mode_cls_token ...). With pooling
"auto" that is read from beside the model; "mean"/"cls" force it, "none" turns it off.

    mode, normalize = detect_pooling(Path("all-MiniLM-L6-v2"))   # ("mean", True)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from surgery.errors import CheckpointError, OptionError
from surgery.io.guards import escape_name, load_json

#: outputs of a pooled export (Optimum's names for a sentence-transformers model)
POOLED_OUTPUTS = {"token_embeddings": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}}
_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


def _modules(model_dir: Path) -> list[dict[str, Any]]:
    path = model_dir / "modules.json"
    if not path.is_file():
        return []
    mods = load_json(path, expect=list)
    return [m for m in mods if isinstance(m, dict)]


def detect_pooling(model_dir: Path) -> tuple[str, bool]:
    """(mode, normalize) from a sentence-transformers layout; ("none", False) without one.

    Raises:
        CheckpointError: a pooling mode the graph cannot compute (max, mean-sqrt-len, several),
            or an unreadable pooling config.

    Example: detect_pooling(Path("fixtures/tiny-bert")) == ("none", False)
    """
    mods = _modules(model_dir)
    pool_dir = next((m.get("path") for m in mods if str(m.get("type", "")).endswith(".Pooling")), "1_Pooling")
    cfg_path = model_dir / str(pool_dir or "1_Pooling") / "config.json"
    if not cfg_path.is_file():
        return "none", False
    cfg = load_json(cfg_path)
    on = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True)
    if len(on) != 1 or on[0] not in _MODES:
        raise CheckpointError(f"{escape_name(cfg_path)} asks for pooling {', '.join(on) or 'none'}; export-onnx "
                              "computes mean or cls pooling only: set pooling 'none' to export token embeddings")
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in mods)
    return _MODES[on[0]], normalize


def resolve_pooling(model_dir: Path, task: str, pooling: str, normalize: bool | None) -> tuple[str, bool]:
    """The pooling and normalisation to build in: the options', else what the directory says.

    Raises:
        OptionError: pooling (or normalize) asked for with a task other than text feature-extraction."""
    if pooling == "auto":
        mode, detected_norm = detect_pooling(model_dir) if task == "feature-extraction" else ("none", False)
    else:
        mode, detected_norm = pooling, False
    norm = detected_norm if normalize is None else normalize
    if mode != "none" and task != "feature-extraction":
        raise OptionError(f"pooling applies to feature-extraction, not {task}; set pooling 'none'", field="pooling")
    if norm and mode == "none":
        raise OptionError("normalize needs a pooling ('mean' or 'cls'): it normalises the sentence embedding",
                          field="normalize")
    return mode, bool(norm)


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str, normalize: bool) -> torch.Tensor:
    """(batch, sequence, hidden) -> (batch, hidden): mean over real tokens, or the first token;
    L2-normalised like sentence-transformers' Normalize (eps 1e-12) when asked.

    Example: pool(torch.ones(2, 3, 4), None, "mean", True).norm(dim=1) == 1"""
    if mode == "cls":
        out = hidden[:, 0]
    else:
        m = (torch.ones(hidden.shape[:2], dtype=hidden.dtype) if mask is None else mask.to(hidden.dtype)).unsqueeze(-1)
        out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if not normalize:
        return out
    # = F.normalize(out, dim=1) (x / max(|x|, 1e-12)), without its Expand: onnxruntime's symbolic
    # shape inference cannot follow that Expand, and the transformer fusions then stop early.
    return out / torch.sqrt(torch.clamp((out * out).sum(1, keepdim=True), min=1e-24))


class PooledModel(torch.nn.Module):
    """A transformers base model whose forward also returns the pooled sentence embedding."""

    def __init__(self, model: torch.nn.Module, mode: str, normalize: bool):
        super().__init__()
        self.model = model
        self.mode = mode
        self.normalize = normalize
        self.config = getattr(model, "config", None)

    def forward(self, **kwargs: Any) -> Mapping[str, torch.Tensor]:
        out = self.model(**kwargs)
        hidden = out["last_hidden_state"]
        return {"token_embeddings": hidden,
                "sentence_embedding": pool(hidden, kwargs.get("attention_mask"), self.mode, self.normalize)}
