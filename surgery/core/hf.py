"""Hugging Face and torch glue, in one place: dtypes, devices, quieting, model classes, loading.

Every operation that builds or loads a transformers model goes through here, so the rules
(offline, no remote code, no randomly initialised weights, logging restored afterwards) are
written once.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from surgery.errors import CheckpointError, OptionError

#: the dtypes surgery reads and writes, by their short names (also the CLI's --dtype choices)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

#: loggers that print on their own while models are built, exported or run
_NOISY_LOGGERS = ("transformers", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir",
                  "torch.fx", "onnxruntime")


def parse_dtype(dtype: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """'fp32' | 'fp16' | 'bf16' | a torch dtype among them | None -> torch dtype or None.

    Raises OptionError naming `what` for anything else."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise OptionError(f"{what} must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise OptionError(f"{what} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' -> torch.device; one message everywhere for an unavailable device.

    'auto' picks cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if dev.type not in ("cpu", "cuda"):
        raise OptionError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {str(device)!r} requested but CUDA is not available; use device 'cpu'")
    return dev


@contextlib.contextmanager
def quiet(capture_stdio: bool = False) -> Iterator[io.StringIO]:
    """Silence warnings, transformers / torch.onnx logging and progress bars; restore them after.

    The library never prints. With capture_stdio, what third-party code writes straight to
    stdout/stderr (torch.export prints refused graphs) is captured in the yielded buffer."""
    import transformers.utils.logging as tlog

    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    verbosity = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if capture_stdio:
                stack.enter_context(contextlib.redirect_stderr(sink))
                stack.enter_context(contextlib.redirect_stdout(sink))
            yield sink
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def config_dict(path: str | Path, cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a model directory, checked for what transformers needs offline: present,
    no custom code. Raises CheckpointError."""
    path = Path(path)
    if cfg is None:
        from surgery.io import open_checkpoint

        cfg = open_checkpoint(path).config
    if not cfg or not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; this needs a Hugging Face model directory")
    if cfg.get("auto_map"):
        raise CheckpointError(f"{path}: the model needs custom code (auto_map); surgery never runs remote code")
    return dict(cfg)


def architecture_class(architectures: Any, default: str = "AutoModel") -> type:
    """The transformers class named first in config.json's `architectures`, else `default`
    (an Auto class name). The architecture class keeps the checkpoint's tensor names."""
    import transformers

    archs = list(architectures or [])
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    return cls or getattr(transformers, default)


def load_pretrained(path: str | Path, cls: type | None = None, dtype: torch.dtype = torch.float32,
                    **kwargs: Any) -> torch.nn.Module:
    """Load a model directory offline with transformers, refusing what it would silently fill in.

    `cls` defaults to the class named in config.json. Weights missing from the checkpoint or of
    the wrong shape (which transformers initialises randomly and only logs) are a CheckpointError
    naming them; so is any load failure. The model is returned in eval mode."""
    path = Path(path)
    cfg = config_dict(path)
    cls = cls or architecture_class(cfg.get("architectures"))
    name = getattr(cls, "__name__", str(cls))
    try:
        with quiet(capture_stdio=True):
            model, info = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                              trust_remote_code=False, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {path} as {name} with transformers ({first})") from None
    missing = [str(k) for k in info.get("missing_keys") or []]
    mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or []]
    bad = missing + mismatched
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight(s) of {name} are missing or mis-shaped in the checkpoint "
                              f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); transformers would "
                              "initialise them randomly")
    model.eval()
    return model
