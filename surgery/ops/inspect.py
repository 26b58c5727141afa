"""`inspect`: what is in a checkpoint, from headers only (no tensor data read)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from surgery.io import CheckpointIndex, open_checkpoint

__all__ = ["InspectResult", "inspect_checkpoint", "group_tensors"]

CONFIG_FIELDS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "vocab_size", "max_position_embeddings",
    "n_embd", "n_layer", "n_head", "n_positions", "torch_dtype", "dtype", "tie_word_embeddings",
)
ADAPTER_FIELDS = (
    "peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "fan_in_fan_out",
    "lora_bias", "modules_to_save", "task_type", "base_model_name_or_path",
)

_NUM = re.compile(r"\.(\d+)\.")


def _ranges(nums: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    nums = sorted(set(nums))
    parts, start = [], nums[0]
    for a, b in zip(nums, nums[1:] + [None], strict=True):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b if b is not None else a
    return ",".join(parts)


def group_tensors(index: CheckpointIndex) -> list[dict]:
    """Collapse repeated layers: one row per (name pattern, shape, dtype)."""
    groups: dict[tuple, dict] = {}
    for t in index.tensors.values():
        m = _NUM.search(t.name)
        pattern, num = (t.name[: m.start()] + ".{}." + t.name[m.end():], int(m.group(1))) if m else (t.name, None)
        key = (pattern, t.shape, str(t.dtype).removeprefix("torch."))
        g = groups.setdefault(key, {"pattern": pattern, "shape": list(t.shape), "dtype": key[2],
                                    "layers": [], "count": 0, "params": 0})
        g["count"] += 1
        g["params"] += t.numel
        if num is not None:
            g["layers"].append(num)
    rows = []
    for g in groups.values():
        name = g["pattern"].format(_ranges(g["layers"])) if g["layers"] else g["pattern"]
        rows.append({"name": name, "shape": g["shape"], "dtype": g["dtype"], "count": g["count"],
                     "params": g["params"]})
    return rows


@dataclasses.dataclass
class InspectResult:
    """A checkpoint's summary, from headers only. `to_json()` is the `inspect --json` document."""

    path: str
    kind: str  # "model" | "adapter"
    format: str  # "safetensors" | "bin" | ...
    shards: list[str]
    tensor_count: int
    parameters: int
    bytes: int
    bytes_by_dtype: dict[str, int]
    config: dict[str, Any]  # the fields of config.json / adapter_config.json worth showing
    tied: dict[str, str]  # head not stored -> the tensor it shares
    groups: list[dict]  # repeated layers collapsed (see group_tensors)
    tensors: list[dict]  # every tensor: name, shape, dtype, shard, bytes

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def inspect_checkpoint(path: str | Path) -> InspectResult:
    """A summary of a checkpoint (model or PEFT adapter), read from headers only.

    Args:
        path: a .safetensors / .bin / .pt file, a model directory (single or sharded) or an
            adapter directory.

    Returns:
        An InspectResult (`to_json()` for the JSON document).

    Raises:
        CheckpointError: missing, unknown format, corrupt, or unsafe (a pickle with code).

    Example:
        >>> info = inspect_checkpoint("fixtures/tiny-llama")
        >>> info.kind, info.parameters
    """
    index = open_checkpoint(path)
    cfg = index.config or {}
    fields = ADAPTER_FIELDS if index.kind == "adapter" else CONFIG_FIELDS
    return InspectResult(
        path=str(path),
        kind=index.kind,
        format=index.format,
        shards=[str(s.name) for s in index.shards],
        tensor_count=len(index.tensors),
        parameters=index.total_params,
        bytes=index.total_bytes,
        bytes_by_dtype=index.dtypes(),
        config={k: cfg[k] for k in fields if k in cfg},
        tied=index.tied,
        groups=group_tensors(index),
        tensors=[
            {"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
             "shard": t.shard.name, "bytes": t.nbytes}
            for t in index.tensors.values()
        ],
    )
