"""surgery: model surgery and export for PyTorch and Hugging Face checkpoints.

The Python API mirrors the CLI, one function per command; each takes its inputs, an output
path and either an options object or the options' fields as keyword arguments, and returns a
result dataclass (`.to_json()`):

    from surgery import open_checkpoint, extract_lora, merge, export_onnx

    idx = open_checkpoint("fixtures/tiny-bert")                  # headers only
    res = extract_lora("fixtures/tiny-bert", "fixtures/tiny-bert-ft", "out/lora", rank=4)
    merge("fixtures/tiny-bert", ["out/lora"], "out/merged")
    export_onnx("out/merged", "out/onnx")                         # validated; raises ValidationError

Bad input raises a `SurgeryError` subclass (surgery.errors) with a one-line message.
Names are imported lazily: `import surgery` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use)
_API = {
    "open_checkpoint": "surgery.io",
    "LazyReader": "surgery.io",
    "ShardedWriter": "surgery.io",
    "inspect_checkpoint": "surgery.ops.inspect",
    "analyze": "surgery.ops.analyze",
    "extract_lora": "surgery.ops.extract",
    "merge": "surgery.ops.merge",
    "apply_adapters_to_model": "surgery.ops.merge",
    "refine_adapter": "surgery.ops.refine",
    "init_lora": "surgery.ops.init_lora",
    "init_adapter": "surgery.ops.bottleneck",
    "attach_bottleneck": "surgery.ops.bottleneck",
    "factorize": "surgery.ops.factorize",
    "load_factorized": "surgery.ops.factorize",
    "export_onnx": "surgery.onnx.export",
    "truncated_svd": "surgery.core.lowrank",
    "SurgeryError": "surgery.errors",
    "CheckpointError": "surgery.errors",
    "AdapterError": "surgery.errors",
    "OptionError": "surgery.errors",
    "OutputError": "surgery.errors",
    "ValidationError": "surgery.errors",
    "ResourceError": "surgery.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
