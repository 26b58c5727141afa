"""Checkpoint index: what is in a checkpoint, from headers only.

`open_checkpoint(path)` recognises a single .safetensors file, a Hugging Face
directory (single or sharded safetensors, or pytorch_model.bin, single or
sharded), a bare .bin/.pt file, and a PEFT adapter directory. It reads no
tensor data for safetensors; .bin/.pt files are opened with
torch.load(weights_only=True, mmap=True), which maps the data without reading it
and refuses pickles that would run code.

Every file read from a directory must be a regular file that resolves inside it (a
symlink out of the directory is refused), except in a Hugging Face hub cache snapshot,
whose files are links into the cache repo's blobs/ (see guards.source_root).
"""

from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from .guards import check_regular, escape_name, load_json, open_regular, resolves_inside, source_root
from .safetensors_header import read_header

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# A legacy (pre-1.6, non-zip) PyTorch file cannot be memory-mapped: torch.load reads it
# whole into memory. Old BERT/GPT-2-era checkpoints (up to ~1.3 GB) still load; bigger
# ones are refused with the fix (re-save or convert) instead of costing their size in RAM.
LEGACY_TORCH_MAX_BYTES = 2 * 2**30
_ZIP_MAGIC = b"PK\x03\x04"


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
    return load_json(path)  # one line on anything odd: size, depth, duplicate keys, numbers


# What torch's weights-only unpickler blocked, from its message (which opens with a
# paragraph of advice to retry unsafely): (pattern, what the pickle does).
_BLOCKED = [
    (r"GLOBAL (\S+) was not an allowed global", "calls {0}"),
    (r"unsupported GLOBAL (\S+) whose module \S+ is blocked", "calls {0}"),
    (r"call reduce for unrecognized function (.+?)(?: which belongs to|$)", "calls {0}"),
    (r"Can only (?:create new object|build) .*? but got (.+)", "builds an object of {0}"),
    (r"(\S+) must be imported to load", "needs {0} (tensor subclasses are not loaded)"),
    (r"Unsupported operand (\d+)", "uses pickle opcode {0}, which plain weights never need"),
    (r"persistent_load id|persistent id|persistent_load of", "loads a persistent object other than a tensor storage"),
]


def _blocked(e: BaseException) -> str:
    """'calls posix.system', 'builds an object of <class ...>', ...: what was blocked, in a few words."""
    text = str(e)
    for pattern, what in _BLOCKED:
        m = re.search(pattern, text, re.M)
        if m:
            return "the pickle " + what.format(*(escape_name(g.strip(), 120) for g in m.groups()))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "documentation" not in ln]
    last = lines[-1] if lines else type(e).__name__
    return "the pickle holds something other than tensors: " + escape_name(last, 160)


def _is_zip(path: Path) -> tuple[bool, int]:
    with open_regular(path) as f:  # a FIFO or device is refused here, before torch opens it
        return f.read(4) == _ZIP_MAGIC, os.fstat(f.fileno()).st_size


def safe_torch_load(path: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a pickle that carries code is refused, unrun.

    Zip files (torch >= 1.6) are memory-mapped when mmap is True; a legacy non-zip file
    is read whole, so one over LEGACY_TORCH_MAX_BYTES is refused."""
    path = Path(path)
    zipped, size = _is_zip(path)
    if not zipped and size > LEGACY_TORCH_MAX_BYTES:
        raise CheckpointError(
            f"{escape_name(path)}: a legacy (non-zip) PyTorch file of {size} bytes would be read whole into memory "
            f"(limit {LEGACY_TORCH_MAX_BYTES}); re-save it with torch.save or convert it to safetensors"
        )
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
        except RuntimeError as e:
            if mmap and zipped and "mmap" in str(e):  # an old zip layout that cannot be mapped
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
            else:
                raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{escape_name(path)}: refused: {_blocked(e)} (blocked by weights_only); only plain weight files "
            f"are loaded, convert it to safetensors in a trusted environment"
        ) from None
    except Exception as e:  # noqa: BLE001 - a corrupt zip/pickle raises anything (KeyError, struct.error, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{escape_name(path)}: cannot load PyTorch file ({escape_name(msg, 200)}); is it corrupt or truncated?"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{escape_name(path)}: not a state dict of named tensors; save model.state_dict() instead"
        )
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


def _q(name: object) -> str:
    return f"'{escape_name(name, 200)}'"


def _checked(p: Path, allowed: Path, where: str) -> Path:
    """p, refused unless it exists, resolves inside `allowed` and is a regular file."""
    if not p.exists():
        if p.is_symlink():
            raise CheckpointError(
                f"{escape_name(p)}: a broken symbolic link (its target is missing); re-download the checkpoint"
            )
        raise CheckpointError(
            f"{where}: {_q(p.name)} is missing from {escape_name(p.parent)}; re-download the checkpoint"
        )
    if not resolves_inside(p, allowed):
        raise CheckpointError(
            f"{where}: {_q(p.name)} resolves outside the checkpoint directory (symlink?); refusing to read it, "
            f"copy the file into the directory if you trust it"
        )
    check_regular(p)
    return p


def _shard_path(root: Path, allowed: Path, index_file: Path, name: object) -> Path:
    where = escape_name(index_file)
    if not isinstance(name, str) or not name or "\x00" in name:
        shown = _q(name) if isinstance(name, str) else repr(name)[:80]
        raise CheckpointError(f"{where}: invalid shard name {shown} in weight_map")
    try:
        os.fsencode(name)
    except UnicodeError:
        raise CheckpointError(
            f"{where}: invalid shard name {_q(name)} in weight_map (not encodable as a file name)"
        ) from None
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(
            f"{where}: shard {_q(name)} points outside the checkpoint directory; refusing to read it"
        )
    return _checked(root / p, allowed, where)


def _sharded(root: Path, allowed: Path, index_file: Path, reader) -> tuple[list[Path], dict[str, TensorInfo]]:
    where = escape_name(index_file)
    data = _read_json(_checked(index_file, allowed, escape_name(root)))
    wm = data.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{where}: missing or empty 'weight_map'; re-download the checkpoint")
    shards: list[Path] = []
    for name in wm.values():
        p = _shard_path(root, allowed, index_file, name)
        if p not in shards:
            shards.append(p)
    shards.sort(key=lambda p: p.name)
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for info in reader(shard):
            if info.name in tensors:
                raise CheckpointError(
                    f"{where}: tensor {_q(info.name)} appears in both {_q(tensors[info.name].shard.name)} "
                    f"and {_q(shard.name)}"
                )
            tensors[info.name] = info
    for tname, sname in wm.items():
        info = tensors.get(tname)
        if info is None or info.shard.name != Path(sname).name:
            raise CheckpointError(
                f"{where}: tensor {_q(tname)} is listed in {_q(sname)} but not stored there; "
                f"the index does not match its shards"
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
    archs = config.get("architectures")
    archs = " ".join(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ""
    if head == "lm_head.weight":
        return "CausalLM" in archs or "LMHead" in archs or "ForConditionalGeneration" in archs
    return "MaskedLM" in archs or "ForPreTraining" in archs


def open_checkpoint(path: str | Path) -> CheckpointIndex:
    """Index a checkpoint from its headers. Raises CheckpointError with a fix.

    Args:
        path: a .safetensors/.bin/.pt file, a model directory (single or sharded,
            safetensors or .bin) or a PEFT adapter directory; a Hugging Face hub cache
            snapshot directory works as is.

    Returns:
        The CheckpointIndex (names, shapes, dtypes, shards, config, tied heads).

    Raises:
        CheckpointError: missing, unknown, corrupt, unsafe (a pickle that runs code, a
        symlink out of the directory, a FIFO or device), or inconsistent.

    Example:
        >>> idx = open_checkpoint("fixtures/tiny-llama")                       # doctest: +SKIP
        >>> idx.format, len(idx.shards)
        ('safetensors', 3)
    """
    src = Path(path)
    if not src.exists():
        if src.is_symlink():
            raise CheckpointError(f"{escape_name(src)}: a broken symbolic link (its target is missing)")
        raise CheckpointError(f"{escape_name(src)}: no such file or directory")
    if not src.is_dir():
        if src.suffix not in (".safetensors", *TORCH_SUFFIXES):
            raise CheckpointError(
                f"{escape_name(src)}: unknown checkpoint format; expected .safetensors, .bin, .pt or a model directory"
            )
        fmt, shards, tensors = _single(src)
        return CheckpointIndex(src.parent, "model", fmt, tensors, shards, None, {}, src)
    allowed = source_root(src)
    if os.path.lexists(src / "adapter_config.json"):
        return _open_adapter(src, allowed)
    return _open_model(src, allowed)


def _present(root: Path, name: str) -> bool:
    """Anything by that name, even a FIFO or a broken link (which are then refused, not skipped)."""
    return os.path.lexists(root / name)


def _open_adapter(root: Path, allowed: Path) -> CheckpointIndex:
    where = escape_name(root)
    cfg = _read_json(_checked(root / "adapter_config.json", allowed, where))
    for fname in ("adapter_model.safetensors", "adapter_model.bin"):
        if _present(root, fname):
            fmt, shards, tensors = _single(_checked(root / fname, allowed, where))
            return CheckpointIndex(root, "adapter", fmt, tensors, shards, cfg, {}, root)
    raise CheckpointError(
        f"{where}: adapter_config.json found but no adapter_model.safetensors or adapter_model.bin"
    )


def _open_model(root: Path, allowed: Path) -> CheckpointIndex:
    where = escape_name(root)
    config = _read_json(_checked(root / "config.json", allowed, where)) if _present(root, "config.json") else None
    if _present(root, "model.safetensors.index.json"):
        fmt = "safetensors"
        shards, tensors = _sharded(root, allowed, root / "model.safetensors.index.json", _safetensors_infos)
    elif _present(root, "model.safetensors"):
        fmt, shards, tensors = _single(_checked(root / "model.safetensors", allowed, where))
    elif _present(root, "pytorch_model.bin.index.json"):
        fmt = "torch"
        shards, tensors = _sharded(root, allowed, root / "pytorch_model.bin.index.json", _torch_infos)
    elif _present(root, "pytorch_model.bin"):
        fmt, shards, tensors = _single(_checked(root / "pytorch_model.bin", allowed, where))
    else:
        found = sorted(root.glob("*.safetensors"))
        if len(found) != 1:
            raise CheckpointError(
                f"{where}: no checkpoint found (expected model.safetensors, a sharded index.json, "
                f"pytorch_model.bin or adapter_config.json)"
            )
        fmt, shards, tensors = _single(_checked(found[0], allowed, where))
    return CheckpointIndex(root, "model", fmt, tensors, shards, config, _find_tied(tensors, config), root)
