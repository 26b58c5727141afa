"""The PyTorch side of an export: the model (loaded offline, adapters merged), its inputs and
outputs, and the random input sets both the exporter and the checks feed it.

    model, config, task = load_hf_model("fixtures/tiny-llama", adapters=["fixtures/tiny-llama-lora"])
    prep = prepare("fixtures/tiny-bert", ExportOptions())    # wrapper + IOSpec + task
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.core.hf import architecture_class, config_dict, quiet
from surgery.errors import CheckpointError, OptionError
from surgery.io.guards import escape_name, load_json
from surgery.onnx.spec import CUSTOM_TASK, InputSpec, IOSpec
from surgery.onnx.tasks import TASK_TABLE, arch_task, auto_task, check_task, modality, valid_tasks
from surgery.options.export import TASK_ALIASES, ExportOptions

#: the transformers Auto class that builds each task's model
TASK_CLASSES = {name: t.auto_class for name, t in TASK_TABLE.items()}
#: Wrapped's extra key: compute position_ids from attention_mask (causal LMs, logits only)
POSITIONS_FROM_MASK = "_positions_from_mask"
#: the seed of weights transformers initialises itself (a head allowed by allow_random_head)
INIT_SEED = 0
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, ImportError)


# ----------------------------------------------------------------------------- config and task


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model directory, refusing what surgery never runs (remote code).

    Raises:
        CheckpointError: no such directory, no/unreadable config.json, or custom code asked for.
    """
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {escape_name(model_dir)} does not exist; pass a Hugging Face model "
                              "directory")
    if not os.path.lexists(cfg_path):
        raise CheckpointError(f"{escape_name(model_dir)} has no config.json; export-onnx needs a Hugging Face model "
                              "directory")
    raw = load_json(cfg_path)  # a FIFO, a JSON bomb, duplicate keys: one line
    if not raw:
        raise CheckpointError(f"{escape_name(cfg_path)} is an empty JSON object; fix or regenerate the config")
    if raw.get("trust_remote_code"):
        raise CheckpointError(f"{escape_name(cfg_path)} asks for remote code (trust_remote_code); surgery never runs "
                              "code shipped with a checkpoint — pass the module via the Python API (model=)")
    return config_dict(model_dir, raw)  # the shared rules (auto_map, quantization_config refused)


def resolve_task(task: str, raw: Mapping[str, Any]) -> str:
    """`task` (an alias resolved), or for "auto" the one config.json's architectures compute
    (never dropping the checkpoint's head); refused when the architecture cannot export it.

    Raises:
        OptionError: field task: a head no task computes, or a task the architecture lacks
            (the message lists the valid ones).

    Example: resolve_task("auto", {"model_type": "vit", "architectures": ["ViTForImageClassification"]})
        == "image-classification"
    """
    task = TASK_ALIASES.get(task, task)
    model_type = raw.get("model_type") if isinstance(raw.get("model_type"), str) else None
    if task == "auto":
        task = auto_task(raw)
    if task not in TASK_TABLE:
        raise OptionError(f"task '{task}' is not an export task; valid tasks: {', '.join(valid_tasks(model_type))}",
                          field="task")
    check_task(task, model_type)
    return task


def model_class(task: str, architectures: Any, model_type: str | None = None) -> Any:
    """The class config.json names when it computes `task`, else the task's Auto class."""
    import transformers

    task = TASK_ALIASES.get(task, task)
    auto = architecture_class(None, TASK_CLASSES[task])
    named = architecture_class(architectures, TASK_CLASSES[task])
    ok = (isinstance(named, type) and issubclass(named, transformers.PreTrainedModel)
          and arch_task(named.__name__, model_type) == task)
    return named if ok else auto


# ----------------------------------------------------------------------------- loading


def _head_keys(model: torch.nn.Module, keys: set[str]) -> set[str]:
    """Those of `keys` outside the model's backbone (its task head); none for a base model."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(model, prefix, None), torch.nn.Module):
        return set()
    return {k for k in keys if not k.startswith(prefix + ".")}


def _dropped_head(raw: Mapping[str, Any], config: Any, loaded: type) -> set[str]:
    """Weights of the checkpoint's own head that `loaded` (another task's class) leaves out:
    unexpected by transformers, and rightly so. Built on the meta device (no memory)."""
    import transformers

    archs = raw.get("architectures") or []
    own = architecture_class(archs, "AutoModel")
    if not (isinstance(own, type) and issubclass(own, transformers.PreTrainedModel)) or own is loaded:
        return set()
    try:
        with quiet(capture_stdio=True), torch.device("meta"):
            model = own(config)
    except Exception:  # noqa: BLE001 - cannot build it: no head is known, every unexpected key is refused
        return set()
    return _head_keys(model, set(model.state_dict()))


def _shapes(key: Any) -> str:
    """'name (checkpoint (100, 32), config (200, 32))' from a transformers mismatch entry."""
    if isinstance(key, tuple) and len(key) == 3:
        return f"{escape_name(key[0], 200)} (checkpoint {tuple(key[1])}, config.json {tuple(key[2])})"
    return escape_name(key[0] if isinstance(key, tuple) else key, 200)


_WHY = {
    "head": "transformers would initialise them randomly; export the task the checkpoint was saved for "
            "(task 'auto'), or set allow_random_head if a random head is what you want",
    "missing": "transformers would initialise them randomly; config.json describes weights the checkpoint does not "
               "hold (more layers? another architecture?): fix config.json or the checkpoint",
    "mis-shaped": "transformers would initialise them randomly; config.json's sizes (hidden_size, vocab_size...) "
                  "do not match the checkpoint: fix config.json or the checkpoint",
    "unexpected": "transformers would ignore them; if they are a head, export the task it computes (task), else "
                  "merge or remove them (an unmerged adapter? renamed weights?)",
}


def _check_loading(model_dir: Path, model: torch.nn.Module, info: Mapping[str, Any], dropped: set[str],
                   allow_random_head: bool) -> None:
    """Refuse weights transformers would make up (missing, mis-shaped) or ignore (unexpected),
    naming them (escaped) and saying why."""
    name = type(model).__name__
    missing = {str(k) for k in info.get("missing_keys") or []}
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda k: str(k[0] if isinstance(k, tuple) else k))
    unexpected = sorted({str(k) for k in info.get("unexpected_keys") or []} - dropped)
    head_only = bool(missing) and _head_keys(model, missing) == missing
    problems = [("missing", "head" if head_only else "missing",
                 [] if head_only and allow_random_head else [escape_name(k, 200) for k in sorted(missing)]),
                ("mis-shaped", "mis-shaped", [_shapes(k) for k in mismatched]),
                ("unexpected", "unexpected", [escape_name(k, 200) for k in unexpected])]
    for what, why, keys in problems:
        if keys:
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            raise CheckpointError(f"{escape_name(model_dir)}: {len(keys)} weight(s) {what} for {name} ({shown}); "
                                  f"{_WHY[why]}")


def _from_pretrained(model_dir: Path, raw: Mapping[str, Any], task: str, allow_random_head: bool) -> Any:
    from transformers import AutoConfig

    try:
        with quiet(capture_stdio=True), torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)  # whatever transformers initialises itself is the same every run
            config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
            cls = model_class(task, raw.get("architectures"), getattr(config, "model_type", None))
            # Eager attention: plain MatMul/Softmax in the graph, which both exporters handle and
            # onnxruntime's Attention fusion recognises (SDPA's mask path does not fuse).
            # ignore_mismatched_sizes: a weight whose shape differs from config.json is then listed
            # in info["mismatched_keys"] (and refused by _check_loading, named), not a bare ValueError
            model, info = cls.from_pretrained(
                model_dir, config=config, dtype=torch.float32, attn_implementation="eager",
                trust_remote_code=False, local_files_only=True, output_loading_info=True,
                ignore_mismatched_sizes=True,
            )
    except _LOAD_ERRORS as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {escape_name(model_dir)} as {task} with transformers "
                              f"({escape_name(first, 200)}); check config.json's model_type/architectures and the "
                              "task") from None
    if task.endswith("feature-extraction"):
        # Head classes built without a pooler (BertForTokenClassification...) lack the base
        # model's pooler weights; the export returns last_hidden_state, which never reads them.
        info["missing_keys"] = [k for k in info.get("missing_keys") or [] if not str(k).startswith("pooler.")]
    _check_loading(model_dir, model, info, _dropped_head(raw, config, type(model)), allow_random_head)
    return model


def _apply_adapters(model: torch.nn.Module, adapters: Sequence[str | os.PathLike]) -> torch.nn.Module:
    """Fold adapters into the loaded model's weights with surgery.ops.merge (PEFT's numerics,
    every key checked, no PEFT needed at run time)."""
    if adapters:
        from surgery.ops.merge import apply_adapters_to_model

        apply_adapters_to_model(model, [Path(a) for a in adapters])
    return model


def load_hf_model(model_dir: str | Path, task: str = "auto", adapters: Sequence[str | os.PathLike] = (), *,
                  allow_random_head: bool = False) -> tuple[torch.nn.Module, Any, str]:
    """Load a local Hugging Face model in fp32 with eager attention, adapters merged.

    Offline (local files only), never remote code. A `surgery factorize` output loads as its
    factorised model. Weights missing from the checkpoint, mis-shaped, or present but unused
    are refused; only the head of the checkpoint's own architecture may go unused (exporting
    a causal LM's backbone as feature-extraction), and a missing task head is accepted, seeded,
    with allow_random_head.

    Args:
        model_dir: a Hugging Face model directory.
        task: "auto" (from config.json's architectures) or one of TASKS.
        adapters: LoRA adapter directories to merge into the weights.
        allow_random_head: accept a task head the checkpoint lacks.

    Returns:
        (model in eval mode, transformers config, resolved task).

    Raises:
        CheckpointError: unreadable directory/config, remote code, unloadable or incomplete weights.
        AdapterError: an adapter that does not match the model.

    Example:
        model, config, task = load_hf_model("fixtures/tiny-gpt2")   # task == "causal-lm"
    """
    model_dir = Path(model_dir)
    raw = read_config(model_dir)
    task = resolve_task(task, raw)
    if (model_dir / "factorization.json").is_file():  # a `surgery factorize` output
        from surgery.ops.factorize import load_factorized

        model = _apply_adapters(load_factorized(model_dir, torch.float32), adapters)
        return model.eval(), model.config, task
    # Index the checkpoint ourselves first: shard paths must stay inside the directory,
    # headers must be sane, pickles must be weights only (transformers checks none of it).
    from surgery.io import open_checkpoint

    open_checkpoint(model_dir)
    model = _from_pretrained(model_dir, raw, task, allow_random_head)
    return _apply_adapters(model, adapters).eval(), model.config, task


# ----------------------------------------------------------------------------- inputs and outputs


def _text_inputs(config: Any, params: Mapping[str, Any], task: str) -> list[InputSpec]:
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise CheckpointError(f"config of {escape_name(config.model_type, 80)} has no vocab_size; a text model "
                              "needs one")
    axes: tuple[str, ...] = ("batch", "choices", "sequence") if task == "multiple-choice" else ("batch", "sequence")
    inputs = [InputSpec("input_ids", axes, torch.int64, 0, vocab)]
    if "attention_mask" in params:
        inputs.append(InputSpec("attention_mask", axes, torch.int64, 1, 2))
    # BERT-like segment embeddings (RoBERTa has type_vocab_size 1: its tokenizers send none;
    # GPT-2's forward takes token_type_ids but has no segment table).
    n_types = int(getattr(config, "type_vocab_size", 0) or 0)
    if n_types >= 2 and "token_type_ids" in params:
        inputs.append(InputSpec("token_type_ids", axes, torch.int64, 0, n_types))
    return inputs


def _image_size(config: Any) -> tuple[int, int]:
    size = getattr(config, "image_size", None) or 224
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    if isinstance(size, Mapping):
        return int(size.get("height", 224)), int(size.get("width", 224))
    return int(size), int(size)


def model_inputs(config: Any, params: Mapping[str, Any], task: str) -> list[InputSpec]:
    """The inputs of a transformers model for `task`: token ids (+ mask, segments), pixel_values
    (batch, channels, height, width: fixed image size) or input_values (batch, samples)."""
    kind = modality(getattr(config, "model_type", None))
    if kind == "text+vision":  # texts and images, each with its own batch
        vision, text = getattr(config, "vision_config", config), getattr(config, "text_config", config)
        h, w = _image_size(vision)
        return _text_inputs(text, params, task) + [
            InputSpec("pixel_values", ("image_batch", int(getattr(vision, "num_channels", 3) or 3), h, w),
                      torch.float32)]
    if kind == "vision":
        h, w = _image_size(config)
        return [InputSpec("pixel_values", ("batch", int(getattr(config, "num_channels", 3) or 3), h, w),
                          torch.float32)]
    if kind == "audio":
        return [InputSpec("input_values", ("batch", "samples"), torch.float32)]
    return _text_inputs(config, params, task)


def hf_spec(model: torch.nn.Module, config: Any, task: str) -> tuple[IOSpec, dict[str, Any]]:
    """Inputs (from the forward signature and config) and outputs (from the task) of a
    transformers model, and the fixed keyword arguments its forward gets: (spec, extra)."""
    task = TASK_ALIASES.get(task, task)  # earlier names (sequence-classification) still work
    params = inspect.signature(model.forward).parameters
    inputs = model_inputs(config, params, task)
    extra: dict[str, Any] = {"return_dict": True}
    if "use_cache" in params or task == "causal-lm":
        extra["use_cache"] = False  # no KV cache in or out: logits only
    if task == "causal-lm" and "position_ids" in params and "attention_mask" in params:
        # Positions from the mask inside the graph, as generate computes them: a left-padded batch
        # is then right (GPT-2 and others count positions from the first column otherwise).
        extra[POSITIONS_FROM_MASK] = True
    seq = "frames" if inputs[0].name == "input_values" else "sequence"
    outputs = {name: {a: (seq if d == "seq" else d) for a, d in axes.items()}
               for name, axes in TASK_TABLE[task].outputs.items()} if task in TASK_TABLE else \
        {"last_hidden_state": {0: "batch", 1: "sequence"}}
    text = getattr(config, "text_config", None) or config
    max_pos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    pad = getattr(text, "pad_token_id", None)
    return IOSpec(inputs, outputs, int(max_pos) if max_pos else None, int(pad) if pad is not None else 0), extra


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """position_ids as transformers' generate computes them: the count of real tokens before each
    one (padding gets 1). Example: [[0, 0, 1, 1, 1]] -> [[1, 1, 0, 1, 2]]"""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


class Wrapped(torch.nn.Module):
    """Positional inputs in spec order -> tuple of outputs in spec order (what the exporters want)."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str],
                 hf: bool, extra: Mapping[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.hf = hf
        self.extra = dict(extra or {})
        self.positions_from_mask = bool(self.extra.pop(POSITIONS_FROM_MASK, False))

    def forward(self, *args: torch.Tensor):
        if self.hf:
            kwargs = dict(zip(self.input_names, args, strict=False))
            if self.positions_from_mask and "position_ids" not in kwargs:
                kwargs["position_ids"] = positions_from_mask(kwargs["attention_mask"])
            out = self.model(**kwargs, **self.extra)
        else:
            out = self.model(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, Mapping):  # dict or transformers ModelOutput
            out = tuple(out[n] for n in self.output_names)
        else:
            out = tuple(out)[: len(self.output_names)]
        return out


def wrap(torch_model: torch.nn.Module, task: str, spec: IOSpec | None) -> tuple[Wrapped, IOSpec]:
    """A transformers model (spec from its config and task) or a module with an explicit spec -> wrapper."""
    if isinstance(torch_model, Wrapped):
        if spec is None:
            raise OptionError("a wrapped module needs spec=", field="spec")
        return torch_model, spec
    config = getattr(torch_model, "config", None)
    if config is None:
        if spec is None:
            raise OptionError("a plain nn.Module needs spec=IOSpec(...) describing its inputs and outputs",
                              field="spec")
        return Wrapped(torch_model, [i.name for i in spec.inputs], list(spec.outputs), hf=False), spec
    hf_io, extra = hf_spec(torch_model, config, task)
    spec = spec or hf_io
    return Wrapped(torch_model, [i.name for i in spec.inputs], list(spec.outputs), hf=True, extra=extra), spec


# ----------------------------------------------------------------------------- the prepared model


@dataclass
class Prepared:
    """What the export phases work on: the wrapped model, its I/O, task, config and where it came from."""

    wrapper: Wrapped
    spec: IOSpec
    task: str
    config: Any  # transformers config, or None for a custom module
    source: str
    pooling: dict[str, Any] | None = None  # sentence-transformers pooling built into the graph

    @property
    def model_type(self) -> str | None:
        return getattr(self.config, "model_type", None)


def prepare_module(model: torch.nn.Module, inputs: Sequence[InputSpec] | None,
                   outputs: Mapping[str, Mapping[int, str]] | None, opts: ExportOptions) -> Prepared:
    """A module passed from Python, described by `inputs` (and `outputs`, default one "output")."""
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"model= must be a torch.nn.Module, got {type(model).__name__}", field="model")
    if not inputs:
        raise OptionError("model= needs inputs=[InputSpec(...)] describing its positional inputs", field="inputs")
    if opts.adapters:
        raise OptionError("adapters apply to Hugging Face model directories, not to a model= module",
                          field="adapters")
    outs = {k: dict(v) for k, v in (outputs or {"output": {0: "batch"}}).items()}
    spec = IOSpec(list(inputs), outs)
    wrapper = Wrapped(model.eval(), [i.name for i in inputs], list(outs), hf=False)
    task = CUSTOM_TASK if opts.task == "auto" else opts.task
    return Prepared(wrapper, spec, task, None, f"module {type(model).__name__}")


def prepare(model_dir: str | Path, opts: ExportOptions,
            outputs: Mapping[str, Mapping[int, str]] | None = None) -> Prepared:
    """Load a model directory for export (see load_hf_model); `outputs` overrides the task's."""
    model_dir = Path(model_dir)
    hf, config, task = load_hf_model(model_dir, opts.task, opts.adapters, allow_random_head=opts.allow_random_head)
    spec, extra = hf_spec(hf, config, task)
    from surgery.onnx.pooling import POOLED_OUTPUTS, PooledModel, resolve_pooling

    mode, normalize = resolve_pooling(model_dir, task, opts.pooling, opts.normalize)
    if mode != "none":  # sentence-transformers: token and sentence embeddings
        hf = PooledModel(hf, mode, normalize)
        spec.outputs = {k: dict(v) for k, v in POOLED_OUTPUTS.items()}
    if outputs:
        spec.outputs = {k: dict(v) for k, v in outputs.items()}
    wrapper = Wrapped(hf, [i.name for i in spec.inputs], list(spec.outputs), hf=True, extra=extra)
    prep = Prepared(wrapper.eval(), spec, task, config, str(model_dir))
    prep.pooling = {"mode": mode, "normalize": normalize} if mode != "none" else None
    return prep


# ----------------------------------------------------------------------------- input sets


def make_inputs(spec: IOSpec, batch: int, seq: int, pad_rows: Mapping[int, int] | None = None,
                seed: int = 0, left: bool = False) -> dict[str, torch.Tensor]:
    """Random inputs at (batch, seq), seeded; pad_rows {row: valid_length} zeroes attention_mask past it
    (before it with left=True: left padding, as batched generation pads).

    The sequence is cut to the model's position limit. Example:
        make_inputs(spec, 4, 11, pad_rows={1: 6})["attention_mask"][1].tolist() == [1]*6 + [0]*5"""
    if spec.max_sequence:
        seq = min(seq, spec.max_sequence)
    g = torch.Generator().manual_seed(seed)
    # raw audio: 160 samples a step (10 ms at 16 kHz); multiple choice: 3-5 choices
    sizes = {"batch": batch, "sequence": seq, "samples": seq * 160, "choices": 3 + seed % 3,
             "image_batch": batch + 1}
    out: dict[str, torch.Tensor] = {}
    for inp in spec.inputs:
        shape = [sizes.get(d, 1) if isinstance(d, str) else int(d) for d in inp.shape]
        if inp.dtype.is_floating_point:
            t = torch.randn(shape, generator=g).to(inp.dtype)
        elif inp.name == "attention_mask":
            t = torch.ones(shape, dtype=inp.dtype)
        else:
            t = torch.randint(inp.low, max(inp.high, inp.low + 1), shape, generator=g, dtype=inp.dtype)
        out[inp.name] = t
    for row, length in (pad_rows or {}).items():
        length = min(length, seq)
        cut = slice(0, seq - length) if left else slice(length, seq)
        if "attention_mask" in out:
            out["attention_mask"][row, ..., cut] = 0  # (..., a choices axis for multiple-choice)
        if "input_ids" in out:
            out["input_ids"][row, ..., cut] = spec.pad_token_id
    return out


def default_input_sets(spec: IOSpec, left_padded: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Three sets, none at the export shape (2x7): 1x5, an odd 3x13, and a right-padded 4x11; with
    left_padded (causal LMs) a fourth, left-padded 3x9, as batched generation pads."""
    sets = {
        "b1_s5": make_inputs(spec, 1, 5, seed=1),
        "b3_s13": make_inputs(spec, 3, 13, seed=2),
        "b4_s11_padded": make_inputs(spec, 4, 11, pad_rows={1: 6, 3: 3}, seed=3),
    }
    if left_padded:
        sets["b3_s9_left_padded"] = make_inputs(spec, 3, 9, pad_rows={0: 4, 2: 7}, seed=4, left=True)
    return sets
