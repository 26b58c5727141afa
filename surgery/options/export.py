"""Options of `export-onnx`: what to export, how, and how strictly to check it.

Torch-free (the CLI builds this before any heavy import); the constants here are the one
definition the exporter, the checks and the CLI's choices share.

    opts = ExportOptions(task="causal-lm", dtype="fp16", optimize=True)
    opts.tolerances()            # (0.1, 0.05): the fp16 defaults
    ExportOptions(opset=3)       # OptionError('opset: must be ...', field='opset')
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from surgery.errors import OptionError
from surgery.options.base import (
    Options,
    device_name,
    finite_number,
    one_of,
    positive_int,
    require,
)

#: what the exported graph computes (Optimum's task names); "auto" reads it from config.json's architectures
TASKS = ("auto", "feature-extraction", "fill-mask", "text-classification", "token-classification",
         "question-answering", "multiple-choice", "image-classification", "image-feature-extraction",
         "audio-classification", "automatic-speech-recognition", "zero-shot-image-classification", "causal-lm",
         "text-generation-with-past", "text2text-generation", "text2text-generation-with-past",
         "automatic-speech-recognition-with-past")
#: the task exported as a decoder with past (Optimum's layout, surgery.onnx.decoder); "auto" on a
#: causal LM means it too, unless cache=False
WITH_PAST_TASK = "text-generation-with-past"
#: encoder-decoder tasks (surgery.onnx.seq2seq): encoder_model.onnx + decoder_model.onnx, and with past
#: decoder_with_past_model.onnx (Optimum's layout); "auto" on a *ForConditionalGeneration means one of them
SEQ2SEQ_TASKS = ("text2text-generation", "text2text-generation-with-past", "automatic-speech-recognition-with-past")
#: the logits-only causal-LM tasks, one graph without a cache (scoring)
LOGITS_ONLY_TASKS = ("causal-lm", "text-generation")
#: other names accepted for a task -> the name used (earlier names, Optimum's text-generation)
TASK_ALIASES = {"sequence-classification": "text-classification", "text-generation": "causal-lm"}
#: sentence-transformers pooling inside the graph ("auto": from 1_Pooling/config.json beside the model)
POOLINGS = ("auto", "none", "mean", "cls")
#: onnxruntime dynamic quantisation of the exported graph (CPU)
QUANTIZATIONS = ("int8",)
#: a module passed from Python (model=) with its own inputs/outputs
CUSTOM_TASK = "custom"
#: which torch.onnx exporter writes the graph: "auto" tries the faster one first and falls back to
#: the other (legacy first, its graph checked against PyTorch at other sizes);
#: "dynamo" / "legacy" run that one only
EXPORTERS = ("auto", "dynamo", "legacy")
#: weight dtypes of the exported graph (fp16: fp16 weights, fp32 inputs/outputs)
ONNX_DTYPES = ("fp32", "fp16")
# Opset 18: the dynamo exporter's native opset in torch 2.x, has LayerNormalization (17+),
# and every onnxruntime since 1.14 runs it.
DEFAULT_OPSET = 18
MIN_OPSET = 14  # scaled_dot_product_attention / trilu need >= 14
# Default tolerances per weight dtype. A value passes when |onnx - torch| <= atol*scale + rtol*|torch|,
# scale = max |torch| of that output (atol is relative to the output's magnitude)
# fp16 weights keep ~3 significant digits, and errors add up over layers.
TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-3}, "fp16": {"atol": 1e-1, "rtol": 5e-2}}

#: keyword names of the earlier export_onnx API -> field names
ALIASES = {"validate": "validation", "benchmark_threads": "threads"}


def max_opset() -> int:
    """Highest opset the installed onnx package knows (imports onnx)."""
    import onnx.defs

    return int(onnx.defs.onnx_opset_version())


@dataclasses.dataclass(frozen=True)
class ExportOptions(Options):
    """How `export_onnx` exports and validates a model.

    Attributes:
        task: "auto" (the head config.json's architectures name; never drops it), one of TASKS
            (Optimum's names; TASK_ALIASES accepted: sequence-classification, text-generation),
            or "custom" (a module passed from Python).
        opset: ONNX opset, MIN_OPSET..the installed onnx's newest.
        dtype: "fp32", or "fp16" (fp16 weights and compute, fp32 inputs/outputs).
        device: where validation runs: "auto" (CUDA when onnxruntime really loads it), "cpu",
            "cuda" or "cuda:N". An unusable CUDA falls back to the CPU, and the result says so.
        optimize: also write model_optimized.onnx (fused / optimised graph), validated the same way.
        atol, rtol: tolerances (None: TOLERANCES[dtype]).
        validation: compare onnxruntime with eager PyTorch on three input sets (keyword
            `validate` in export_onnx, like the CLI's --validate/--no-validate).
        benchmark: time PyTorch eager vs onnxruntime at 1x128 and 8x128 (with past: prefill and
            per-token decode latency at contexts 16/240/1024 vs PyTorch generate with its cache).
        cache: a causal LM with task "auto" is exported with its KV cache (text-generation-with-past);
            False exports the logits-only graph (for scoring). An encoder-decoder with task "auto" is
            exported as text2text-generation-with-past (Whisper: automatic-speech-recognition-with-past);
            False leaves out decoder_with_past_model.onnx.
        adapters: LoRA adapter directories merged into the model before export.
        threads: CPU threads for torch and onnxruntime (None: their own choice).
        pooling: sentence-transformers pooling inside the graph, output "sentence_embedding":
            "mean", "cls", "none", or "auto" (what 1_Pooling/config.json beside the model says;
            none without it). feature-extraction only.
        normalize: L2-normalise the pooled embedding (None: as modules.json says, a Normalize module).
        quantize: "int8": also write model_int8.onnx (onnxruntime dynamic quantisation, for the
            CPU), validated at the task level (embedding cosine / top-1 agreement).
        allow_random_head: accept a task head the checkpoint lacks (e.g. a classifier on a base
            model), initialised randomly (seeded); its outputs mean nothing. Refused by default.
        exporter: "auto" (the faster exporter that gives a correct graph, the other one as fallback;
            the manifest's "exporter"/"exporter_note" say which ran and why), "dynamo"
            (torch.onnx.export(dynamo=True) only) or "legacy" (the TorchScript exporter only).
        overwrite: replace an existing output directory.

    Raises:
        OptionError: naming the field at fault, when the object is built.
    """

    task: str = "auto"
    opset: int = DEFAULT_OPSET
    dtype: str = "fp32"
    device: str = "auto"
    optimize: bool = False
    atol: float | None = None
    rtol: float | None = None
    validation: bool = True
    benchmark: bool = False
    adapters: tuple[str | os.PathLike, ...] = ()
    threads: int | None = None
    allow_random_head: bool = False
    overwrite: bool = False
    cache: bool = True
    pooling: str = "auto"
    normalize: bool | None = None
    quantize: str | None = None
    exporter: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.adapters, (list, str, os.PathLike)):  # one path or a list: stored as a tuple
            adapters = [self.adapters] if isinstance(self.adapters, (str, os.PathLike)) else self.adapters
            object.__setattr__(self, "adapters", tuple(adapters))
        if isinstance(self.task, str) and self.task in TASK_ALIASES:  # one name per task from here on
            object.__setattr__(self, "task", TASK_ALIASES[self.task])
        super().__post_init__()

    def validate(self) -> None:  # noqa: D102 - see Options.validate
        one_of(self.task, TASKS + (CUSTOM_TASK,), "task")
        one_of(self.dtype, ONNX_DTYPES, "dtype")
        one_of(self.pooling, POOLINGS, "pooling")
        one_of(self.exporter, EXPORTERS, "exporter")
        require(self.normalize is None or isinstance(self.normalize, bool), "normalize",
                f"must be True, False or None, got {self.normalize!r}")
        if self.quantize is not None:
            one_of(self.quantize, QUANTIZATIONS, "quantize")
            require(self.dtype == "fp32", "quantize", "int8 quantises the fp32 graph; use dtype fp32 with it")
        if self.device != "auto":
            device_name(self.device, "device", extra=("auto",))
        require(isinstance(self.opset, int) and not isinstance(self.opset, bool) and self.opset >= MIN_OPSET,
                "opset", f"must be an integer >= {MIN_OPSET}, got {self.opset!r}; the default is {DEFAULT_OPSET}")
        if self.opset > DEFAULT_OPSET:  # every onnx we run on knows the default: import it only past that
            top = max_opset()
            require(self.opset <= top, "opset", f"{self.opset} is newer than the installed onnx knows ({top}); "
                    f"use {DEFAULT_OPSET}")
        finite_number(self.atol, "atol", lo=0, allow_none=True)
        finite_number(self.rtol, "rtol", lo=0, allow_none=True)
        positive_int(self.threads, "threads", allow_none=True)
        require(isinstance(self.adapters, tuple) and all(isinstance(a, (str, os.PathLike)) for a in self.adapters),
                "adapters", f"must be a sequence of adapter directories, got {self.adapters!r}")
        for name in ("optimize", "validation", "benchmark", "allow_random_head", "overwrite", "cache"):
            value = getattr(self, name)
            require(isinstance(value, bool), name, f"must be True or False, got {value!r}")
        require(self.cache or not self.task.endswith("-with-past"), "cache",
                f"cannot be False with task {self.task!r} (that task is the graph with the cache)")
        require(not (self.optimize and self.task == WITH_PAST_TASK), "optimize",
                f"applies to the logits-only graph; task {WITH_PAST_TASK!r} writes one graph (Optimum's layout)")
        require(not (self.optimize and self.task in SEQ2SEQ_TASKS), "optimize",
                f"applies to the one-graph export; task {self.task!r} writes Optimum's encoder/decoder graphs")

    def tolerances(self) -> tuple[float, float]:
        """(atol, rtol): the ones given, else the defaults for `dtype`.

        Example: ExportOptions(dtype="fp16", atol=0.2).tolerances() == (0.2, 0.05)"""
        default = TOLERANCES[self.dtype]
        return (default["atol"] if self.atol is None else float(self.atol),
                default["rtol"] if self.rtol is None else float(self.rtol))

    @classmethod
    def build(cls, options: ExportOptions | None = None, **fields: Any) -> ExportOptions:
        """`options` with `fields` replaced, or ExportOptions(**fields): what the library entry points take.

        Raises OptionError for a bad value and for an unknown field name. The keywords of the
        earlier API are accepted: `validate` (= validation), `benchmark_threads` (= threads).

        Example: ExportOptions.build(None, dtype="fp16") == ExportOptions(dtype="fp16")"""
        fields = {ALIASES.get(k, k): v for k, v in fields.items()}
        unknown = sorted(set(fields) - set(cls.field_names()))
        if unknown:
            raise OptionError(f"{unknown[0]}: not an export option; the options are {', '.join(cls.field_names())}",
                              field=unknown[0])
        if options is None:
            return cls(**fields)
        if not isinstance(options, cls):
            raise OptionError(f"options: must be an {cls.__name__}, got {type(options).__name__}", field="options")
        return options.replace(**fields) if fields else options
