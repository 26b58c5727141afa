"""Greedy generation with the KV cache on onnxruntime, checked step by step against PyTorch `generate`.

    report = validate_generation(model, "out/")         # raises ValidationError(report=...) on failure
    report.passed, report.worst.tol_ratio, report.onnx_tokens["left_padded"]

What is compared (the graph layout is Optimum's `text-generation-with-past`, see decoder.py):

  PyTorch  model.generate(greedy, use_cache, output_logits) on a LEFT-PADDED batch of prompts of
           different lengths (one longer than the export's dummy length) and on a batch of one
  onnxruntime  prefill with an empty cache (past length 0), then one token per step, feeding the
           `present.*` outputs back as `past_key_values.*`; attention_mask grows by one column per
           step, position_ids are HF's (cumsum(mask) - 1)
  per step  the last position's logits: |onnx - torch| <= atol·scale + rtol·|torch|, scale = the
           step's max |torch logit|; and argmax(onnx) == argmax(torch) (a different token is
           tolerated only at a tie: the reference's margin between the two is within twice the
           tolerance, which any difference inside the tolerance can flip)

Teacher forcing: every step feeds PyTorch's token to both, so one tie cannot make the rest of the
sequence incomparable; while the tokens agree (the normal case) this is exactly greedy decoding.
Eos is masked to -inf on both sides (min_new_tokens = new_tokens), so every run is `new_tokens` long.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.errors import CheckpointError, OptionError, ValidationError
from surgery.io.guards import escape_name, load_json

#: names and layout of Optimum's `text-generation-with-past` (and onnxruntime-genai's templates)
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"

#: per weight dtype: atol is relative to the step's logit scale (max |torch logit|), rtol to each logit
GENERATION_TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-3}, "fp16": {"atol": 2e-2, "rtol": 2e-2}}
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass
class StepRow:
    """One decoding step of one prompt set: last-position logits of every row compared."""

    prompt_set: str
    step: int  # 0 = the prefill's last position
    past_length: int  # cache length fed to the graph at this step
    max_abs_diff: float
    scale: float  # max |torch logit| at this step
    tol_ratio: float  # max |diff| / (atol·scale + rtol·|torch|); ≤ 1 passes
    tokens_equal: bool
    passed: bool


@dataclass
class GenerationReport:
    """Result of validate_generation: one row per step, the tokens of both sides, the mismatches."""

    provider: str
    provider_note: str
    dtype: str  # weights / cache dtype of the ONNX graph
    atol: float
    rtol: float
    new_tokens: int
    export_length: int | None  # the export's dummy total length (past + sequence), when known
    prompt_lengths: dict[str, list[int]] = field(default_factory=dict)
    rows: list[StepRow] = field(default_factory=list)
    torch_tokens: dict[str, list[list[int]]] = field(default_factory=dict)
    onnx_tokens: dict[str, list[list[int]]] = field(default_factory=dict)
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # token differences (ties included)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.rows) and all(r.passed for r in self.rows) and not any(
            not m["tie"] for m in self.mismatches)

    @property
    def worst(self) -> StepRow | None:
        return max(self.rows, key=lambda r: r.tol_ratio, default=None)

    def failure_message(self) -> str:
        """One line saying what failed, or '' when the report passed."""
        if self.error:
            return self.error
        bad = [m for m in self.mismatches if not m["tie"]]
        if bad:
            m = bad[0]
            return (f"onnxruntime chose token {m['onnx']} where PyTorch chose {m['torch']} (prompt set "
                    f"'{m['prompt_set']}', row {m['row']}, step {m['step']}; reference margin {m['margin']:.3g} "
                    f"is no tie) on {self.provider}")
        w = self.worst
        if w is None or w.passed:
            return "" if w is not None else "no step was compared"
        return (f"logits of step {w.step} (prompt set '{w.prompt_set}', past length {w.past_length}) differ from "
                f"PyTorch: max abs diff {w.max_abs_diff:.3g} is {w.tol_ratio:.3g}x the tolerance (atol {self.atol:g}"
                f"·scale {w.scale:.3g} + rtol {self.rtol:g}·|ref|) on {self.provider}")


# ----------------------------------------------------------------------------- the graph's layout


@dataclass(frozen=True)
class _GraphLayout:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    num_layers: int
    kv_shape: tuple[int, int]  # (kv_heads, head_dim)
    kv_dtype: Any  # numpy dtype of past_key_values.*


def _graph_layout(sess) -> _GraphLayout:
    """Read names, layer count, cache shape and dtype from a session; refuse a graph without a cache."""
    ins = {i.name: i for i in sess.get_inputs()}
    layers = sorted({int(m.group(1)) for n in ins if (m := _PAST_RE.match(n))})
    if not layers or "input_ids" not in ins:
        raise ValidationError("the ONNX graph has no past_key_values.* inputs; it is not a with-past decoder "
                              "export (validate a logits-only graph with validate_onnx)")
    first = ins[PAST_KEY % layers[0]]
    shape = first.shape
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise ValidationError(f"{first.name} has shape {shape}; expected (batch, kv_heads, past, head_dim)")
    kv_dtype = _NP_DTYPES.get(first.type)
    if kv_dtype is None:
        raise ValidationError(f"{first.name} is {first.type}; expected float or float16")
    return _GraphLayout(tuple(ins), tuple(o.name for o in sess.get_outputs()), len(layers),
                        (shape[1], shape[3]), kv_dtype)


# ----------------------------------------------------------------------------- prompts


def default_prompts(vocab_size: int, special: Sequence[int], export_length: int | None,
                    seed: int = 0) -> dict[str, list[list[int]]]:
    """Prompt sets: a left-padded batch of three lengths (the longest past the export's dummy
    total length) and a batch of one. Tokens avoid the special ids (pad, bos, eos)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([t for t in range(vocab_size) if t not in set(special)] or list(range(vocab_size)))
    long = max(20, (export_length or 12) + 9)

    def draw(n: int) -> list[int]:
        return pool[torch.randint(0, len(pool), (n,), generator=g)].tolist()

    return {"left_padded": [draw(3), draw(8), draw(long)], "single": [draw(6)]}


def _left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, max_len), padded on the left."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, n - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, n - len(p):] = 1
    return ids, mask


def _position_ids(mask: np.ndarray) -> np.ndarray:
    """HF generate's position ids: cumsum(mask) - 1, padding positions set to 1."""
    pos = np.cumsum(mask, axis=-1) - 1
    pos[mask == 0] = 1
    return pos.astype(np.int64)


# ----------------------------------------------------------------------------- the two sides


def _torch_reference(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, pad: int,
                     device: torch.device) -> tuple[np.ndarray, list[np.ndarray]]:
    """PyTorch greedy generate with the cache: (sequences (b, s + n), raw logits per step (b, vocab))."""
    from transformers import GenerationConfig

    from surgery.core.hf import quiet

    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          use_cache=True, output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
    with quiet(), torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)
    logits = [lg.detach().float().cpu().numpy() for lg in out.logits]
    return out.sequences.cpu().numpy(), logits


def _ort_steps(sess, lay: _GraphLayout, ids: np.ndarray, mask: np.ndarray, sequences: np.ndarray,
               new_tokens: int) -> list[tuple[np.ndarray, int]]:
    """Prefill (empty cache) then one token per step, teacher-forced with `sequences`:
    [(last-position logits (b, vocab), past length fed)]."""
    b, s = ids.shape
    kv, hd = lay.kv_shape
    past = {n: np.zeros((b, kv, 0, hd), lay.kv_dtype) for n in lay.inputs if _PAST_RE.match(n)}
    feed_ids, feed_mask = ids, mask
    steps: list[tuple[np.ndarray, int]] = []
    for step in range(new_tokens):
        past_len = feed_mask.shape[1] - feed_ids.shape[1]
        feed = {"input_ids": feed_ids, "attention_mask": feed_mask, **past}
        if "position_ids" in lay.inputs:
            feed["position_ids"] = _position_ids(feed_mask)[:, past_len:]
        try:
            outs = dict(zip(lay.outputs, sess.run(None, feed), strict=True))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ValidationError(f"onnxruntime failed at step {step} (past length {past_len}): {first}") from None
        steps.append((np.asarray(outs["logits"][:, -1, :], dtype=np.float32), past_len))
        for i in range(lay.num_layers):
            for src, dst in ((PRESENT_KEY, PAST_KEY), (PRESENT_VALUE, PAST_VALUE)):
                present = outs[src % i]
                if present.shape[2] != past_len + feed_ids.shape[1]:
                    raise ValidationError(f"{src % i} has length {present.shape[2]} at step {step}; expected "
                                          f"past {past_len} + sequence {feed_ids.shape[1]}")
                past[dst % i] = present
        feed_ids = sequences[:, s + step: s + step + 1].astype(np.int64)
        feed_mask = np.concatenate([feed_mask, np.ones((b, 1), np.int64)], axis=1)
    return steps


# ----------------------------------------------------------------------------- comparison


def _greedy(logits: np.ndarray, eos: Sequence[int]) -> np.ndarray:
    """argmax per row, eos masked (min_new_tokens = new_tokens masks it at every step)."""
    x = logits.astype(np.float64).copy()
    if eos:
        x[:, [e for e in eos if 0 <= e < x.shape[1]]] = -np.inf
    return x.argmax(-1)


def _compare_step(name: str, step: int, past_len: int, ref: np.ndarray, got: np.ndarray, atol: float,
                  rtol: float, eos: Sequence[int]) -> tuple[StepRow, list[dict[str, Any]], list[int]]:
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    scale = float(np.abs(r).max()) if r.size else 0.0
    tol = atol * max(scale, 1e-12) + rtol * np.abs(r)
    diff = np.abs(g - r)
    finite = bool(np.isfinite(g).all())
    # atol = rtol = 0 demands exact equality: any difference is an infinite overshoot
    over = np.divide(diff, tol, out=np.where(diff > 0, np.inf, 0.0), where=tol > 0)
    ratio = float(over.max()) if finite and over.size else (0.0 if finite else float("inf"))
    t_ref, t_got = _greedy(r, eos), _greedy(g, eos)
    mismatches = []
    for row in np.nonzero(t_ref != t_got)[0]:
        a, b = int(t_ref[row]), int(t_got[row])
        margin = float(r[row, a] - r[row, b])
        mismatches.append({"prompt_set": name, "row": int(row), "step": step, "torch": a, "onnx": b,
                           "margin": margin, "tie": bool(finite and margin <= tol[row, a] + tol[row, b])})
    max_abs = float(diff.max()) if finite else float("inf")
    row_ = StepRow(name, step, past_len, max_abs, scale, ratio, not mismatches, finite and ratio <= 1.0)
    return row_, mismatches, t_got.tolist()


# ----------------------------------------------------------------------------- entry point


def make_session(path: Path, device: str, threads: int | None = None):
    """check.make_session (CUDA only when the provider really loads): (session, provider, note)."""
    from surgery.onnx.check import make_session as make

    return make(path, device, threads)


def _read_manifest(onnx_dir: Path) -> dict[str, Any]:
    path = onnx_dir / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        return load_json(path)  # the strict reader: a JSON bomb or duplicate keys read as no manifest
    except CheckpointError:
        return {}


def _eos_ids(model) -> list[int]:
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return [int(e) for e in ([] if eos is None else (eos if isinstance(eos, (list, tuple)) else [eos]))]


def _pad_id(model, eos: Sequence[int]) -> int:
    for src in (getattr(model, "generation_config", None), model.config):
        pad = getattr(src, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return eos[0] if eos else 0


def _reference_model(model: torch.nn.Module, kv_dtype: Any, device: torch.device) -> torch.nn.Module:
    """The model in the graph's dtype on `device`: a copy when either differs (inputs are never modified)."""
    want = torch.float16 if kv_dtype == np.float16 else torch.float32
    p = next(model.parameters())
    if p.dtype == want and p.device == device:
        return model
    return copy.deepcopy(model).to(device=device, dtype=want).eval()


def validate_generation(model: Any, onnx_dir: str | Path, *,
                        prompts: dict[str, list[list[int]]] | None = None, new_tokens: int = 16,
                        device: str = "auto", atol: float | None = None, rtol: float | None = None,
                        threads: int | None = None, raise_on_failure: bool = True) -> GenerationReport:
    """Greedy-decode with the exported cache on onnxruntime and compare with PyTorch's `generate`.

    Args:
        model: the exported transformers causal LM; copied (never changed) when the graph runs in
            another dtype or on another device.
        onnx_dir: a directory written by export_decoder_with_past.
        prompts: {set name: [token id lists]}, each set one left-padded batch. Default: three lengths,
            the longest past the export's dummy length, and a batch of one.
        new_tokens: tokens generated per prompt (≥ 1). device: "auto" (CUDA when onnxruntime's
            provider really loads) | "cpu" | "cuda". threads: onnxruntime intra-op threads.
        atol, rtol: default GENERATION_TOLERANCES of the graph's dtype.
        raise_on_failure: raise ValidationError(report=...) when the report fails.

    Returns:
        GenerationReport (rows per step, tokens of both sides, mismatches, provider).

    Raises:
        CheckpointError (no model.onnx), OptionError (new_tokens < 1, empty prompt set),
        ValidationError (no with-past decoder graph; or, raise_on_failure, outputs differ).

    Example:
        >>> report = validate_generation(model, "out/llama-onnx", new_tokens=32)
        >>> report.passed, report.provider
        (True, 'CPUExecutionProvider')
    """
    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / MODEL_FILE).is_file():
        raise CheckpointError(f"{escape_name(onnx_dir)} has no {MODEL_FILE}; export it with export_decoder_with_past")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise OptionError(f"new_tokens must be an integer ≥ 1, got {new_tokens!r}", field="new_tokens")
    sess, provider, note = make_session(onnx_dir / MODEL_FILE, device, threads)
    lay = _graph_layout(sess)
    dtype = "fp16" if lay.kv_dtype == np.float16 else "fp32"
    tol = GENERATION_TOLERANCES[dtype]
    export_length = _read_manifest(onnx_dir).get("export_shapes", {}).get("total_sequence_length")
    report = GenerationReport(provider, note, dtype, tol["atol"] if atol is None else float(atol),
                              tol["rtol"] if rtol is None else float(rtol), new_tokens, export_length)
    eos = _eos_ids(model)
    pad = _pad_id(model, eos)
    if prompts is None:
        special = [pad, *eos, getattr(model.config, "bos_token_id", None) or 0]
        prompts = default_prompts(int(model.config.get_text_config().vocab_size), special, export_length)
    if any(not rows or not all(len(p) for p in rows) for rows in prompts.values()):
        raise OptionError("every prompt set needs at least one non-empty prompt", field="prompts")
    tdev = torch.device("cuda" if provider == "CUDAExecutionProvider" and torch.cuda.is_available() else "cpu")
    ref_model = _reference_model(model, lay.kv_dtype, tdev)
    try:
        for name, rows in prompts.items():
            _validate_set(report, sess, lay, ref_model, name, rows, pad, eos, tdev)
    except ValidationError as e:
        report.error = str(e)
    if raise_on_failure and not report.passed:
        raise ValidationError(report.failure_message(), report=report)
    return report


def _validate_set(report: GenerationReport, sess, lay: _GraphLayout, model, name: str,
                  rows: Sequence[Sequence[int]], pad: int, eos: Sequence[int], tdev: torch.device) -> None:
    """One prompt set: reference generate, onnxruntime loop, per-step rows appended to report."""
    n = report.new_tokens
    ids, mask = _left_pad(rows, pad)
    sequences, ref_logits = _torch_reference(model, ids, mask, n, pad, tdev)
    if len(ref_logits) != n:
        raise ValidationError(f"PyTorch generate stopped after {len(ref_logits)} of {n} tokens on prompt set "
                              f"'{name}'; the reference is incomplete")
    steps = _ort_steps(sess, lay, ids.numpy(), mask.numpy(), sequences, n)
    report.prompt_lengths[name] = [len(p) for p in rows]
    report.torch_tokens[name] = sequences[:, ids.shape[1]:].tolist()
    chosen = []
    for step, ((got, past_len), ref) in enumerate(zip(steps, ref_logits, strict=True)):
        row, mism, toks = _compare_step(name, step, past_len, ref, got, report.atol, report.rtol, eos)
        report.rows.append(row)
        report.mismatches += mism
        chosen.append(toks)
    report.onnx_tokens[name] = np.array(chosen).T.tolist()
