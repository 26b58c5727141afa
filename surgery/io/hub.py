"""Inputs given as Hugging Face Hub ids, resolved from the local Hub cache only.

surgery never downloads: a Hub id (``org/name``) is looked up in huggingface_hub's cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read at each call) and
its snapshot directory is used like any local model directory. An existing local path always wins.

    resolve_model("fixtures/tiny-bert")                       # -> Path("fixtures/tiny-bert")
    resolve_model("sentence-transformers/all-MiniLM-L6-v2")   # -> .../models--.../snapshots/<sha>
    is_hub_id("org/name")                                     # -> True
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

# org/name as the Hub accepts them: letters, digits, '-', '_', '.'; no '..', no leading '.'/'-'
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_hub_id(text: str | Path) -> bool:
    """Whether `text` looks like a Hub model id ``org/name`` (and is not an existing path)."""
    s = str(text)
    return (isinstance(text, str) and _HUB_ID.fullmatch(s) is not None and ".." not in s
            and not s.endswith((".safetensors", ".bin", ".pt", ".pth")) and not Path(s).exists())


def hub_cache_dir() -> Path:
    """The Hub cache directory huggingface_hub would use now (environment read at each call)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_model(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local model path, or the cached snapshot directory of a Hub id.

    Args:
        path_or_id: a file or directory (returned as is when it exists), or a Hub id ``org/name``.
        revision: branch, tag or commit of the Hub repository (default ``main``); ignored for
            local paths.
    Returns:
        Path: the path itself, or ``<cache>/models--org--name/snapshots/<commit>``.
    Raises:
        CheckpointError: a Hub id that is not in the cache (one line, with the download command),
            or a cache entry huggingface_hub cannot read.

    Example:
        >>> resolve_model("org/name")  # with HF_HUB_CACHE=/tmp/hub holding models--org--name
        PosixPath('/tmp/hub/models--org--name/snapshots/0123abcd...')
    """
    if not is_hub_id(path_or_id):
        return Path(path_or_id)
    repo = str(path_or_id)
    cache = hub_cache_dir()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a transformers dependency
        raise CheckpointError(f"{repo}: huggingface_hub is not installed, so Hub ids cannot be resolved; "
                              "give a local directory") from None
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        rev = f" at revision {revision}" if revision else ""
        flag = " --revision " + revision if revision else ""
        why = f"HF_HUB_OFFLINE=1, cache {cache}" if _offline() else f"cache {cache}; surgery never downloads"
        raise CheckpointError(f"{repo}{rev} is not in the Hugging Face cache ({why}): download it first with "
                              f"`huggingface-cli download {repo}{flag}`") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{repo}: cannot read its Hugging Face cache entry in {cache} ({e})") from None


__all__ = ["resolve_model", "is_hub_id", "hub_cache_dir"]
