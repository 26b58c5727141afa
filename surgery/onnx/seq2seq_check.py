"""Greedy generation with an exported encoder-decoder on onnxruntime, checked step by step against PyTorch.

    report = validate_seq2seq(model, "out/")     # raises ValidationError(report=...) on failure

What is compared (files and names: Optimum's seq2seq layout, see seq2seq.py):

  PyTorch      GenerationMixin.generate(greedy, use_cache, output_logits) on a batch of source
               prompts of different lengths, right-padded with an encoder attention mask (Whisper:
               a batch of random log-mel features), and on a batch of one
  onnxruntime  encoder_model.onnx once; decoder_model.onnx on the decoder start token (its
               present.*.encoder is the cross cache from then on); then decoder_with_past_model.onnx
               one token per step, feeding present.*.decoder back as past_key_values.*.decoder
               (without that file: decoder_model.onnx on the whole prefix each step)
  per step     as decoder_check: last-position logits within atol·scale + rtol·|torch|, and the
               greedy tokens equal (a difference is tolerated only at a tie), teacher-forced with
               PyTorch's tokens; eos masked (min_new_tokens = new_tokens)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.errors import ValidationError
from surgery.io.guards import escape_name
from surgery.onnx.decoder_check import (
    _NP_DTYPES,
    GENERATION_TOLERANCES,
    GenerationReport,
    _compare_step,
    _eos_ids,
    _pad_id,
    _reference_model,
)

ENCODER_FILE, DECODER_FILE = "encoder_model.onnx", "decoder_model.onnx"
DECODER_PAST_FILE = "decoder_with_past_model.onnx"
#: past_key_values.{layer}.{decoder|encoder}.{key|value} and present.{layer}.… (Optimum's names)
S2S_PAST, S2S_PRESENT = "past_key_values.%d.%s", "present.%d.%s"


def _run(sess: Any, feed: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(None, feed), strict=True))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValidationError(f"onnxruntime failed running {what}: {first}") from None


def _feed(sess: Any, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's inputs from `values` (encoder_attention_mask is absent from Whisper's graphs)."""
    return {i.name: values[i.name] for i in sess.get_inputs()}


def ort_greedy(sessions: dict[str, Any], source: dict[str, np.ndarray], sequences: np.ndarray,
               new_tokens: int) -> list[tuple[np.ndarray, int]]:
    """Encoder once, decoder on the start token, then the with-past decoder per step, teacher-forced
    with `sequences` (b, 1 + new_tokens): [(last-position logits (b, vocab), past length fed)]."""
    hidden = _run(sessions[ENCODER_FILE], _feed(sessions[ENCODER_FILE], source), ENCODER_FILE)["last_hidden_state"]
    mask = source.get("attention_mask")
    values: dict[str, np.ndarray] = {"encoder_hidden_states": hidden, "input_ids": sequences[:, :1].astype(np.int64)}
    if mask is not None:
        values["encoder_attention_mask"] = mask
    first = _run(sessions[DECODER_FILE], _feed(sessions[DECODER_FILE], values), DECODER_FILE)
    steps = [(np.asarray(first["logits"][:, -1, :], np.float32), 0)]
    past = {n.replace("present.", "past_key_values."): v for n, v in first.items() if n.startswith("present.")}
    with_past = sessions.get(DECODER_PAST_FILE)
    for step in range(1, new_tokens):
        if with_past is None:  # no cache: the whole prefix again
            values["input_ids"] = sequences[:, : step + 1].astype(np.int64)
            out = _run(sessions[DECODER_FILE], _feed(sessions[DECODER_FILE], values), f"{DECODER_FILE} step {step}")
            steps.append((np.asarray(out["logits"][:, -1, :], np.float32), 0))
            continue
        values["input_ids"] = sequences[:, step: step + 1].astype(np.int64)
        out = _run(with_past, _feed(with_past, values | past), f"{DECODER_PAST_FILE} step {step}")
        steps.append((np.asarray(out["logits"][:, -1, :], np.float32), step))
        for n, v in out.items():
            if n.startswith("present."):
                if v.shape[2] != step + 1:
                    raise ValidationError(f"{n} has length {v.shape[2]} at step {step}; expected {step + 1}")
                past[n.replace("present.", "past_key_values.")] = v
    return steps


def _torch_reference(model: Any, source: dict[str, torch.Tensor], new_tokens: int, pad: int,
                     device: torch.device) -> tuple[np.ndarray, list[np.ndarray]]:
    """PyTorch greedy generate with its cache: (sequences (b, 1 + n), raw logits per step (b, vocab)).

    Plain greedy decoding: the GenerationMixin generate (also for Whisper, so no task/language
    tokens are forced) with only this config while it runs (generate fills unset values from the
    model's generation_config, whose forced_bos/forced_eos/suppress_tokens would override the
    argmax); the model's own generation_config is restored afterwards."""
    from transformers import GenerationConfig, GenerationMixin

    from surgery.core.hf import quiet

    start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        start = model.config.decoder_start_token_id
    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          use_cache=True, output_logits=True, return_dict_in_generate=True, pad_token_id=pad,
                          eos_token_id=_eos_ids(model) or None, decoder_start_token_id=start)
    own = model.generation_config
    model.generation_config = gc
    try:
        with quiet(), torch.no_grad():
            out = GenerationMixin.generate(model, **{k: v.to(device) for k, v in source.items()},
                                           generation_config=copy.deepcopy(gc))
    finally:
        model.generation_config = own
    return out.sequences.cpu().numpy(), [lg.detach().float().cpu().numpy() for lg in out.logits]


def default_sources(model: Any, speech_shape: tuple[int, int] | None, dtype: Any,
                    seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Source sets: a batch of three prompts (3, 8, 13 tokens) right-padded with an attention mask
    and a batch of one (6 tokens), avoiding special ids; for speech (mel bins, frames) random
    features, a batch of two and a batch of one."""
    g = torch.Generator().manual_seed(seed)
    if speech_shape is not None:
        feats = torch.randn(3, *speech_shape, generator=g).to(dtype)
        return {"batch": {"input_features": feats[:2]}, "single": {"input_features": feats[2:]}}
    vocab = int(model.config.vocab_size)
    special = set(_eos_ids(model)) | {_pad_id(model, _eos_ids(model))}
    pool = torch.tensor([t for t in range(vocab) if t not in special] or list(range(vocab)))
    pad = _pad_id(model, _eos_ids(model))
    sets = {}
    for name, lengths in (("right_padded", (3, 8, 13)), ("single", (6,))):
        n = max(lengths)
        ids = torch.full((len(lengths), n), pad, dtype=torch.long)
        mask = torch.zeros((len(lengths), n), dtype=torch.long)
        for row, length in enumerate(lengths):
            ids[row, :length] = pool[torch.randint(0, len(pool), (length,), generator=g)]
            mask[row, :length] = 1
        sets[name] = {"input_ids": ids, "attention_mask": mask}
    return sets


def _sessions(onnx_dir: Path, device: str, threads: int | None) -> tuple[dict[str, Any], str, str]:
    from surgery.onnx.check import make_session

    sessions: dict[str, Any] = {}
    provider = note = ""
    for name in (ENCODER_FILE, DECODER_FILE, DECODER_PAST_FILE):
        if (onnx_dir / name).is_file():
            sessions[name], provider, note = make_session(onnx_dir / name, device, threads)
        elif name != DECODER_PAST_FILE:
            raise ValidationError(f"{escape_name(onnx_dir / name)} is missing; validate a directory written by "
                                  "export_seq2seq")
    return sessions, provider, note


def _graph_dtype(sessions: dict[str, Any]) -> tuple[Any, tuple[int, int] | None]:
    """(numpy dtype of the decoder's float inputs, (mel bins, frames) of a speech encoder or None)."""
    enc = {i.name: i for i in sessions[ENCODER_FILE].get_inputs()}
    dec = next(i for i in sessions[DECODER_FILE].get_inputs() if i.name == "encoder_hidden_states")
    np_dtype = _NP_DTYPES.get(dec.type, np.float32)
    feats = enc.get("input_features")
    if feats is None:
        return np_dtype, None
    if not all(isinstance(d, int) for d in feats.shape[1:]):
        raise ValidationError(f"input_features has shape {feats.shape}; expected fixed (mel bins, frames)")
    return np_dtype, (int(feats.shape[1]), int(feats.shape[2]))


def validate_seq2seq(model: Any, onnx_dir: str | Path, *, sources: dict[str, dict[str, torch.Tensor]] | None = None,
                     new_tokens: int = 8, device: str = "auto", atol: float | None = None, rtol: float | None = None,
                     threads: int | None = None, raise_on_failure: bool = True) -> GenerationReport:
    """Greedy-decode with the exported encoder and decoders on onnxruntime and compare with PyTorch `generate`.

    Args:
        model: the exported transformers encoder-decoder (copied, never changed, when the graphs run
            in another dtype or on another device).
        onnx_dir: a directory written by seq2seq.export_seq2seq (encoder_model.onnx, decoder_model.onnx,
            and decoder_with_past_model.onnx when exported with the cache).
        sources: {set name: model inputs (input_ids + attention_mask, or input_features)}; default
            default_sources (a right-padded batch and a batch of one).
        new_tokens: tokens generated per set (≥ 1). device, threads: where onnxruntime and PyTorch run.
        atol, rtol: default GENERATION_TOLERANCES of the graphs' dtype.
        raise_on_failure: raise ValidationError(report=...) when the report did not pass.

    Returns:
        GenerationReport (rows per step and set, tokens of both sides, mismatches).

    Raises:
        OptionError: new_tokens < 1. ValidationError: a missing graph, onnxruntime failed, or (with
        raise_on_failure) the logits or tokens differ.

    Example:
        >>> validate_seq2seq(model, "out/t5-onnx", device="cpu").passed
        True
    """
    from surgery.errors import OptionError
    from surgery.onnx.check import torch_device

    if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
        raise OptionError(f"new_tokens must be a positive integer, got {new_tokens!r}", field="new_tokens")
    sessions, provider, note = _sessions(Path(onnx_dir), device, threads)
    np_dtype, speech = _graph_dtype(sessions)
    dtype = "fp16" if np_dtype == np.float16 else "fp32"
    tol = GENERATION_TOLERANCES[dtype]
    atol, rtol = (tol["atol"] if atol is None else atol), (tol["rtol"] if rtol is None else rtol)
    tdev = torch_device(provider, device)
    ref = _reference_model(model, np_dtype, tdev)
    sets = sources if sources is not None else default_sources(model, speech, next(ref.parameters()).dtype)
    report = GenerationReport(provider, note, dtype, atol, rtol, new_tokens, None)
    eos = _eos_ids(model)
    for name, source in sets.items():
        _check_set(report, name, ref, sessions, source, eos, tdev)
    if raise_on_failure and not report.passed:
        raise ValidationError(report.failure_message(), report=report)
    return report


def _check_set(report: GenerationReport, name: str, ref: Any, sessions: dict[str, Any],
               source: dict[str, torch.Tensor], eos: Sequence[int], tdev: torch.device) -> None:
    """One source set: PyTorch generate, onnxruntime teacher-forced, every step compared into `report`."""
    mask = source.get("attention_mask")
    report.prompt_lengths[name] = (mask.sum(-1).tolist() if mask is not None
                                   else [int(source["input_features"].shape[-1])] * len(next(iter(source.values()))))
    sequences, ref_logits = _torch_reference(ref, source, report.new_tokens, _pad_id(ref, eos), tdev)
    feed = {k: v.cpu().numpy() for k, v in source.items()}
    steps = ort_greedy(sessions, feed, sequences, report.new_tokens)
    tokens: list[list[int]] = [[] for _ in range(sequences.shape[0])]
    for step, ((got, past_len), want) in enumerate(zip(steps, ref_logits, strict=True)):
        row, mism, picked = _compare_step(name, step, past_len, want, got, report.atol, report.rtol, eos)
        report.rows.append(row)
        report.mismatches += mism
        for r, t in enumerate(picked):
            tokens[r].append(int(t))
    report.torch_tokens[name] = sequences[:, 1:].tolist()
    report.onnx_tokens[name] = tokens

