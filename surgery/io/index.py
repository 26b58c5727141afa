"""Checkpoint index: what is in a checkpoint, from headers only.

`open_checkpoint(path)` recognises a single .safetensors file, a Hugging Face
directory (single or sharded safetensors, or pytorch_model.bin, single or
sharded), a bare .bin/.pt file, and a PEFT adapter directory. It reads no
tensor data for safetensors; .bin/.pt files are opened with
torch.load(weights_only=True, mmap=True), which maps the data without reading it
and refuses pickles that would run code.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from .safetensors_header import read_header

TORCH_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: Path
    nbytes: int
    offset: int = 0  # absolute data offset in a safetensors shard (0 for torch files)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class CheckpointIndex:
    root: Path
    kind: str  # "model" | "adapter"
    format: str  # "safetensors" | "torch"
    tensors: dict[str, TensorInfo]
    shards: list[Path]
    config: dict | None = None
    tied: dict[str, str] = field(default_factory=dict)
    source: Path | None = None  # the path the user gave

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtypes(self) -> dict[str, int]:
        """Bytes by dtype name."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            k = str(t.dtype).removeprefix("torch.")
            out[k] = out.get(k, 0) + t.nbytes
        return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix or re-download the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object; fix or re-download the file")
    return data


def safe_torch_load(path: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that carries code is refused, unrun."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # legacy (non-zip) format cannot be mapped
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
            else:
                raise
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to retry with weights_only=False: show the cause instead
        m = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \d+|WeightsUnpickler error:[^.]*)", str(e))
        first = " ".join((m.group(1) if m else str(e)).split())[:160] or "unsupported global"
        raise CheckpointError(
            f"{path}: refused to load: the pickle asks to run code or build objects other than tensors "
            f"({first}); only plain weight files are accepted, convert it to safetensors in a trusted environment"
        ) from None
    except Exception as e:  # noqa: BLE001 - a corrupt zip/pickle raises anything (KeyError, struct.error, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load PyTorch file ({msg[:200]}); is it corrupt or truncated?") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path}: not a state dict of named tensors; save model.state_dict() instead")
    return obj


def _safetensors_infos(shard: Path) -> list[TensorInfo]:
    entries, _ = read_header(shard)
    return [
        TensorInfo(e.name, e.shape, e.dtype, shard, e.end - e.start, e.start)
        for e in entries.values()
    ]


def _torch_infos(shard: Path) -> list[TensorInfo]:
    sd = safe_torch_load(shard, mmap=True)
    return [
        TensorInfo(k, tuple(v.shape), v.dtype, shard, v.numel() * v.element_size())
        for k, v in sd.items()
    ]


def _shard_path(root: Path, index_file: Path, name: object) -> Path:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{index_file}: invalid shard name {name!r} in weight_map")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(
            f"{index_file}: shard {name!r} points outside the checkpoint directory; refusing to read it"
        )
    full = root / p
    try:
        inside = full.resolve().is_relative_to(root.resolve())
    except OSError:
        inside = False
    if not inside:
        raise CheckpointError(
            f"{index_file}: shard {name!r} resolves outside the checkpoint directory (symlink?); refusing to read it"
        )
    if not full.is_file():
        raise CheckpointError(f"{index_file}: shard {name!r} is missing from {root}; re-download the checkpoint")
    return full


def _sharded(root: Path, index_file: Path, reader) -> tuple[list[Path], dict[str, TensorInfo]]:
    data = _read_json(index_file)
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_file}: missing or empty 'weight_map'; re-download the checkpoint")
    shards: list[Path] = []
    for name in wm.values():
        p = _shard_path(root, index_file, name)
        if p not in shards:
            shards.append(p)
    shards.sort(key=lambda p: p.name)
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for info in reader(shard):
            if info.name in tensors:
                raise CheckpointError(
                    f"{index_file}: tensor {info.name!r} appears in both {tensors[info.name].shard.name} "
                    f"and {shard.name}"
                )
            tensors[info.name] = info
    for tname, sname in wm.items():
        info = tensors.get(tname)
        if info is None or info.shard.name != Path(sname).name:
            raise CheckpointError(
                f"{index_file}: tensor {tname!r} is listed in {sname} but not stored there; "
                "the index does not match its shards"
            )
    return shards, tensors


def _single(path: Path) -> tuple[str, list[Path], dict[str, TensorInfo]]:
    if path.suffix == ".safetensors":
        fmt, infos = "safetensors", _safetensors_infos(path)
    else:
        fmt, infos = "torch", _torch_infos(path)
    return fmt, [path], {i.name: i for i in infos}


def _find_tied(tensors: dict[str, TensorInfo], config: dict | None) -> dict[str, str]:
    """Output embeddings that the config ties to the input embeddings."""
    if not config:
        return {}
    tie = config.get("tie_word_embeddings")
    if tie is None and isinstance(config.get("text_config"), dict):
        tie = config["text_config"].get("tie_word_embeddings")
    tie = True if tie is None else tie  # transformers' default
    if not tie:
        return {}
    emb = next(
        (n for n in tensors if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))),
        None,
    )
    if emb is None:
        return {}
    tied = {}
    for head in ("lm_head.weight", "cls.predictions.decoder.weight"):
        if head not in tensors and _has_head(config, head):
            tied[head] = emb
    return tied


def _has_head(config: dict, head: str) -> bool:
    archs = " ".join(config.get("architectures") or [])
    if head == "lm_head.weight":
        return "CausalLM" in archs or "LMHead" in archs or "ForConditionalGeneration" in archs
    return "MaskedLM" in archs or "ForPreTraining" in archs


def open_checkpoint(path: str | Path) -> CheckpointIndex:
    """Index a checkpoint from its headers. Raises CheckpointError with a fix."""
    src = Path(path)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    if src.is_file():
        if src.suffix not in (".safetensors", *TORCH_SUFFIXES):
            raise CheckpointError(
                f"{src}: unknown checkpoint format; expected .safetensors, .bin, .pt or a model directory"
            )
        fmt, shards, tensors = _single(src)
        return CheckpointIndex(src.parent, "model", fmt, tensors, shards, None, {}, src)

    root = src
    if (root / "adapter_config.json").is_file():
        cfg = _read_json(root / "adapter_config.json")
        for fname in ("adapter_model.safetensors", "adapter_model.bin"):
            if (root / fname).is_file():
                fmt, shards, tensors = _single(root / fname)
                return CheckpointIndex(root, "adapter", fmt, tensors, shards, cfg, {}, src)
        raise CheckpointError(
            f"{root}: adapter_config.json found but no adapter_model.safetensors or adapter_model.bin"
        )

    config = _read_json(root / "config.json") if (root / "config.json").is_file() else None
    if (root / "model.safetensors.index.json").is_file():
        fmt = "safetensors"
        shards, tensors = _sharded(root, root / "model.safetensors.index.json", _safetensors_infos)
    elif (root / "model.safetensors").is_file():
        fmt, shards, tensors = _single(root / "model.safetensors")
    elif (root / "pytorch_model.bin.index.json").is_file():
        fmt = "torch"
        shards, tensors = _sharded(root, root / "pytorch_model.bin.index.json", _torch_infos)
    elif (root / "pytorch_model.bin").is_file():
        fmt, shards, tensors = _single(root / "pytorch_model.bin")
    else:
        found = sorted(root.glob("*.safetensors"))
        if len(found) != 1:
            raise CheckpointError(
                f"{root}: no checkpoint found (expected model.safetensors, a sharded index.json, "
                f"pytorch_model.bin or adapter_config.json)"
            )
        fmt, shards, tensors = _single(found[0])
    return CheckpointIndex(root, "model", fmt, tensors, shards, config, _find_tied(tensors, config), src)
