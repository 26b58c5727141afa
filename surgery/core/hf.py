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
from surgery.io.guards import escape_name

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
            raise OptionError(f"{what} must be one of {', '.join(DTYPES)}, got {dtype}", field=what)
        return dtype
    if dtype not in DTYPES:
        raise OptionError(f"{what} must be one of {', '.join(DTYPES)}, got {dtype!r}", field=what)
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

    # get_verbosity first: transformers sets its logger's level when it first configures it,
    # so the levels to restore are read after that
    verbosity = tlog.get_verbosity()
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
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
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def config_dict(path: str | Path, cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a model directory, checked for what transformers needs offline: present,
    no custom code, not quantized (transformers would need bitsandbytes/optimum... and would not
    give the weights surgery works on). Raises CheckpointError."""
    path = Path(path)
    if cfg is None:
        from surgery.io import open_checkpoint

        cfg = open_checkpoint(path).config
    if not cfg or not (path / "config.json").is_file():
        raise CheckpointError(f"{escape_name(path)}: no config.json; this needs a Hugging Face model directory")
    if cfg.get("auto_map"):
        raise CheckpointError(f"{escape_name(path)}: the model needs custom code (auto_map); surgery never runs "
                              "remote code")
    refuse_quantized(path, cfg)
    return dict(cfg)


def refuse_quantized(path: str | Path, cfg: Mapping[str, Any] | None) -> None:
    """Refuse a model whose config.json has a quantization_config: transformers would need
    bitsandbytes / optimum / ... to load it, and its packed integer weights are not the
    matrices surgery works on.

    Raises:
        CheckpointError: one line naming the quantization method and the fix.

    Example:
        >>> refuse_quantized("m/", {"quantization_config": {"quant_method": "gptq"}})
        Traceback (most recent call last):
        surgery.errors.CheckpointError: m/: a quantized model (quantization_config, quant_method 'gptq'); ...
    """
    quant = (cfg or {}).get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, Mapping) else "unknown"
        raise CheckpointError(f"{escape_name(path)}: a quantized model (quantization_config, quant_method "
                              f"'{escape_name(method, 40)}'); surgery works on unquantized weights: use the original "
                              "model, or dequantize it first")


def architecture_class(architectures: Any, default: str = "AutoModel") -> type:
    """The transformers model class named first in config.json's `architectures`.

    Only a class transformers ships that is a `PreTrainedModel` counts (never any other
    attribute of the package, such as `pipeline`); otherwise `default`, an Auto class name.
    The architecture class keeps the checkpoint's tensor names.

    Args:
        architectures: config.json's `architectures` value (a list of names, or anything).
        default: the transformers attribute returned when no usable class is named.

    Returns:
        A class: the architecture, or the default Auto class.

    Example:
        >>> architecture_class(["BertModel"]).__name__
        'BertModel'
        >>> architecture_class(["pipeline"]).__name__
        'AutoModel'
    """
    import transformers

    archs = list(architectures or []) if isinstance(architectures, (list, tuple)) else []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return getattr(transformers, default)


def model_from_config(config: Any, cls: type | None = None) -> torch.nn.Module:
    """A transformers model built from a config object (randomly initialised), quietly.

    Build it under `torch.device("meta")` for the architecture alone (no memory, no data).

    Args:
        config: a transformers `PretrainedConfig`.
        cls: the model class; default: `architecture_class(config.architectures)`. An Auto
            class is built with `from_config`.

    Returns:
        The model (in training mode, as transformers builds it).

    Raises:
        Whatever transformers raises for a config it cannot build (callers decide).

    Example:
        >>> with torch.device("meta"):
        ...     model = model_from_config(AutoConfig.for_model("bert", hidden_size=8, ...))
    """
    cls_: Any = cls or architecture_class(getattr(config, "architectures", None))
    with quiet(capture_stdio=True):
        if cls_.__name__.startswith("Auto"):
            return cls_.from_config(config)
        return cls_(config)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch.set_num_threads(n), then restore; None changes nothing.

    The thread count is process-global (not thread-safe). LAPACK calls inside still run at
    `surgery.core.lowrank.LAPACK_THREADS` (see `lapack_threads`).

    Example:
        >>> with torch_threads(2):
        ...     y = a @ b
    """
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_pretrained(path: str | Path, cls: type | None = None, dtype: torch.dtype = torch.float32,
                    **kwargs: Any) -> torch.nn.Module:
    """Load a model directory offline with transformers, refusing what it would silently fill in.

    `cls` defaults to the class named in config.json. Weights missing from the checkpoint or of
    the wrong shape (which transformers initialises randomly and only logs) are a CheckpointError
    naming them; so is any load failure. The model is returned in eval mode."""
    path = Path(path)
    cfg = config_dict(path)
    cls_: Any = cls or architecture_class(cfg.get("architectures"))
    name = getattr(cls_, "__name__", str(cls_))
    try:
        with quiet(capture_stdio=True):
            # ignore_mismatched_sizes: mis-shaped weights are listed in info (refused below), not a ValueError
            model, info = cls_.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                              trust_remote_code=False, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {escape_name(path)} as {name} with transformers "
                              f"({escape_name(first, 200)})") from None
    missing = [escape_name(k, 200) for k in info.get("missing_keys") or []]
    mismatched = [escape_name(k[0] if isinstance(k, tuple) else k, 200) for k in info.get("mismatched_keys") or []]
    bad = missing + mismatched
    if bad:
        raise CheckpointError(f"{escape_name(path)}: {len(bad)} weight(s) of {name} are missing or mis-shaped in "
                              f"the checkpoint ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
                              "transformers would initialise them randomly")
    model.eval()
    return model
