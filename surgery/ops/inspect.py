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
    what: str = ""  # what this is, in words: "PEFT LoRA adapter (task ..., r 8, targets ...)", "ONNX export ..."
    produced_by: str | None = None  # the surgery command that wrote it, when that can be told
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. an ONNX manifest's summary

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
    from surgery.report.cards import read_card_kind

    p = Path(path)
    if p.is_dir() and (p / "manifest.json").is_file() and not _has_weights(p):
        return _onnx_export(p)
    if p.is_dir() and (p / "adapter").is_dir() and (p / "residual").is_dir():
        return _init_lora(p)
    info = _summary(path, open_checkpoint(path))
    card = read_card_kind(p) if p.is_dir() else None
    info.what, info.produced_by, info.details = _describe(p, info, card)
    return info


def _has_weights(p: Path) -> bool:
    return any((p / n).exists() for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                           "adapter_config.json"))


def _summary(path: str | Path, index: CheckpointIndex) -> InspectResult:
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


def _json(p: Path) -> dict:
    from surgery.io import load_json

    try:
        obj = load_json(p)
    except Exception:  # noqa: BLE001 - a side file inspect cannot read is described as unreadable, not fatal
        return {}
    return obj if isinstance(obj, dict) else {}


def _targets(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v[:4])) + (f" (+{len(v) - 4} more)" if len(v) > 4 else "")
    return str(v)


def adapter_what(cfg: dict) -> str:
    """'PEFT LORA adapter: task CAUSAL_LM, r 8, alpha 16, targets q_proj, v_proj'."""
    return (f"PEFT {cfg.get('peft_type', 'LORA')} adapter: task {cfg.get('task_type') or 'unset'}, "
            f"r {cfg.get('r')}, alpha {cfg.get('lora_alpha')}, targets {_targets(cfg.get('target_modules'))}")


def _describe(p: Path, info: InspectResult, card: str | None) -> tuple[str, str | None, dict]:
    """(what, produced_by, details) of a checkpoint opened as a model or an adapter."""
    if info.kind == "adapter":
        return adapter_what(info.config), card, {}
    if p.is_dir() and (p / "factorization.json").is_file():
        mods = _json(p / "factorization.json").get("modules", {})
        return (f"factorize output: {len(mods)} Linear layers stored as low-rank factor pairs; load it with "
                "surgery.ops.factorize.load_factorized(path)", "factorize", {"factorized_modules": len(mods)})
    if p.is_dir() and (p / "bottleneck_config.json").is_file():
        cfg = _json(p / "bottleneck_config.json")
        return (f"surgery bottleneck adapter: {len(cfg.get('modules', {}))} modules, bottleneck "
                f"{cfg.get('bottleneck')}, placement {cfg.get('placement')}, activation {cfg.get('activation')}; "
                "load it with surgery.ops.bottleneck.load_bottleneck(path)", "bottleneck",
                {k: cfg.get(k) for k in ("bottleneck", "placement", "activation", "init")})
    if card == "merge":
        return "merged model: a base with LoRA adapter(s) merged into its weights (surgery merge)", card, {}
    return "model checkpoint" + (f" (written by surgery {card})" if card else ""), card, {}


def _empty(path: Path, kind: str, fmt: str) -> InspectResult:
    return InspectResult(path=str(path), kind=kind, format=fmt, shards=[], tensor_count=0, parameters=0, bytes=0,
                         bytes_by_dtype={}, config={}, tied={}, groups=[], tensors=[])


def _onnx_export(p: Path) -> InspectResult:
    """An export-onnx directory, described from its manifest.json (no graph is loaded)."""
    m = _json(p / "manifest.json")
    val = m.get("validation") or {}
    files = sorted(f.name for f in p.iterdir() if f.suffix in (".onnx", ".onnx_data", ".data"))
    info = _empty(p, "onnx-export", "onnx")
    info.bytes = sum((p / f).stat().st_size for f in files)
    info.shards = files
    info.details = {"task": m.get("task"), "model_type": m.get("model_type"), "dtype": m.get("dtype"),
                    "status": m.get("status"), "provider": val.get("execution_provider"),
                    "validation_passed": val.get("passed"), "opset": m.get("opset"), "source": m.get("source"),
                    "files": m.get("files")}
    info.what = (f"ONNX export (surgery export-onnx): task {m.get('task')}, dtype {m.get('dtype')}, status "
                 f"{m.get('status')}, validated on {val.get('execution_provider') or 'no provider'}")
    info.produced_by = "export-onnx"
    return info


def _init_lora(p: Path) -> InspectResult:
    """An init-lora directory: the residual model's summary, the adapter and init.json described."""
    info = _summary(p / "residual", open_checkpoint(p / "residual"))
    info.path = str(p)
    info.kind = "init-lora"
    acfg = (open_checkpoint(p / "adapter").config or {})
    init = _json(p / "init.json")
    info.what = (f"init-lora output ({init.get('method', '?')}): adapter/ ({adapter_what(acfg)}) + residual/ "
                 f"(the model minus the adapter's part); PeftModel.from_pretrained(residual, adapter) is the original")
    info.produced_by = "init-lora"
    info.details = {"method": init.get("method"), "rank": init.get("rank"), "alpha": init.get("alpha"),
                    "max_rel_error": init.get("max_rel_error"),
                    "adapter": {k: acfg[k] for k in ADAPTER_FIELDS if k in acfg}}
    return info
