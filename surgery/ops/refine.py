"""refine: train a LoRA adapter's factors to reproduce a fine-tune's *outputs*.

A truncated SVD of a full fine-tune's delta is the best rank-r approximation of the
weights, not of the behaviour. Starting from those factors, we train only A and B so
that BASE + adapter matches the fine-tuned model (the teacher) on unlabeled
calibration text, and keep the checkpoint that is best on a held-out part of it.

    student(x) = base(x) + Σ_modules scaling · (x @ Aᵀ) @ Bᵀ        Linear / Conv1D (fan_in_fan_out)
                 base(ids) + scaling · A.T[ids] @ Bᵀ                 Embedding (A (r, vocab), B (dim, r))

The LoRA forward is our own (forward hooks on the unchanged HF modules; PEFT is a
test-only oracle). Everything else in the adapter is frozen as extract decided:
full tensors (modules_to_save) are loaded into the student base and lora_B.bias
deltas are added as constants.

Objectives (the teacher's side is computed once, cached, and the teacher is released
before the student is loaded, so peak memory is one model + the factors + the cache):
  pooled     1 − cos(mean-pooled, L2-normalised last hidden states)   encoders (default)
  relational MSE between the in-batch cosine-similarity matrices of the student's and the
             teacher's pooled embeddings (retrieval depends on relative geometry)
  hidden     mean over `layers` (default: middle and last) of the per-token MSE of the
             hidden states, normalised by the teacher's mean square
  logits-kl  KL(teacher ‖ student) of the next-token distributions over non-padding
             tokens                                                    causal LMs (default)
  a+b        a weighted sum of components ("pooled+relational", weights=(1, 4))

train_vectors also trains the 1-D deltas the adapter carries (lora_B biases, bias='all'
biases, modules_to_save vectors) at a tenth of lr; patience stops after that many
held-out scorings without improvement. max_length above the model's positions is
lowered to them (a note in the result).

Training: AdamW (no weight decay: decay would pull the factors toward a zero delta),
linear warm-up then cosine decay, gradient clipping at 1.0, dropout off
(model.eval()), batches drawn by a seeded generator: the same inputs, seed and
thread count give the same adapter bytes.

Phases, each a function handing the next a value: _prepare (no model loaded: device,
architectures, objective, tokenised calibration split) -> _teacher_cache (teacher released)
-> _attach (the student) -> _train (held-out scoring by _evaluate) -> _save (best checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from surgery.core.hf import config_dict, load_pretrained, quiet, resolve_device, torch_threads
from surgery.core.peft_format import LoraAdapterConfig, LoraModule, read_adapter, split_token_rows, write_adapter
from surgery.errors import AdapterError, CheckpointError, OptionError, SurgeryError
from surgery.io import check_output_path, escape_name, open_checkpoint
from surgery.io.guards import JSONRefused, check_output_file, decode_json, open_regular, staged_text
from surgery.options.refine import MIN_SAMPLES, OBJECTIVES, RefineOptions

Progress = Callable[..., None]  # (desc, done, total[, postfix])
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_CACHE_LIMIT = 8 * 2**30  # bytes of cached teacher outputs before we refuse (logits are vocab-sized)
_CONFIG_COMPUTED = ("peft_type", "bias", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules",
                    "lora_bias", "use_dora", "use_rslora", "modules_to_save", "fan_in_fan_out", "task_type",
                    "base_model_name_or_path", "trainable_token_indices")


# ----------------------------------------------------------------------------- results


@dataclass
class EvalPoint:
    """Held-out error of the student against the teacher at one step."""

    step: int
    loss: float                # the objective, averaged over the hold-out
    cosine: float | None       # pooled / hidden: mean cosine with the teacher's output
    kl: float | None           # logits-kl: mean KL per token
    max_abs_diff: float        # over the hold-out: embeddings / hidden states / log-probabilities
    parts: dict[str, float] = field(default_factory=dict)  # each component's held-out mean (unweighted)


@dataclass
class RefineResult:
    out: Path
    objective: str
    steps: int
    best_step: int
    train_samples: int
    holdout_samples: int
    trainable_params: int
    no_adapter: EvalPoint       # the bare base against the teacher: the gap to close
    before: EvalPoint           # the adapter as given (the SVD start)
    after: EvalPoint            # the checkpoint saved (best held-out loss)
    curve: list[EvalPoint] = field(default_factory=list)
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last eval)
    cache_bytes: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0  # the training loop, held-out scoring included
    eval_seconds: float = 0.0   # held-out scoring inside the loop
    notes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    steps_run: int = 0          # optimizer steps taken (fewer than steps when early stopping hit patience)
    device: str = "cpu"

    @property
    def steps_per_second(self) -> float:
        """Optimizer steps per second, held-out scoring excluded."""
        t = self.train_seconds - self.eval_seconds
        return self.steps_run / t if t > 0 else 0.0

    @property
    def seconds_per_100_steps(self) -> float:
        """Training speed without the held-out scoring."""
        n = self.steps_run or self.steps
        return 100 * (self.train_seconds - self.eval_seconds) / n if n else 0.0

    @property
    def gap_closed(self) -> float:
        """Share of the base→teacher held-out loss the saved adapter removes (1 = teacher)."""
        gap = self.no_adapter.loss
        return 1.0 - self.after.loss / gap if gap > 0 else 1.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["gap_closed"] = self.gap_closed
        d["seconds_per_100_steps"] = self.seconds_per_100_steps
        d["steps_per_second"] = self.steps_per_second
        d["gap_closed_before"] = 1.0 - self.before.loss / self.no_adapter.loss if self.no_adapter.loss > 0 else 1.0
        return d


# ----------------------------------------------------------------------------- calibration data


#: largest calibration file read (it is held in memory, then tokenised)
MAX_CALIBRATION_BYTES = 2**30


def _calibration_lines(p: Path) -> list[str]:
    """The lines of a calibration file: a regular file (a FIFO is refused unopened), UTF-8."""
    name = escape_name(p)
    if not os.path.lexists(p):
        raise OptionError(f"calibration file {name} not found; give a text file (one sample per line) or JSONL "
                          "with \"text\"", field="calibration")
    try:
        with open_regular(p, error=OptionError, what=f"calibration file {p}") as f:
            raw = f.read(MAX_CALIBRATION_BYTES + 1)
    except OptionError as e:
        raise OptionError(str(e), field="calibration") from None
    except OSError as e:
        raise OptionError(f"cannot read calibration file {name} ({e.strerror or e})", field="calibration") from None
    if len(raw) > MAX_CALIBRATION_BYTES:
        raise OptionError(f"calibration file {name} is over {MAX_CALIBRATION_BYTES // 2**20} MiB; use a sample of it",
                          field="calibration")
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise OptionError(f"calibration file {name} is not UTF-8 text ({e.reason} at byte {e.start})",
                          field="calibration") from None


def _jsonl_texts(p: Path, numbered: list[tuple[int, str]]) -> list[str]:
    """The "text" values of JSONL lines (parsed with the tool's strict JSON reader)."""
    texts = []
    for no, ln in numbered:
        try:
            obj = decode_json(ln.encode("utf-8"))
        except JSONRefused as e:
            raise OptionError(f"{escape_name(p)}:{no}: not valid JSON ({e}); JSONL needs one object per line",
                              field="calibration") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise OptionError(f"{escape_name(p)}:{no}: expected an object with a string \"text\" field",
                              field="calibration")
        if obj["text"].strip():
            texts.append(obj["text"])
    return texts


def read_calibration(path: str | Path) -> list[str]:
    """Samples of a calibration file: one per line, or JSONL objects with a "text" field.

    JSONL is recognised by a .jsonl/.json suffix or a first non-blank line starting with "{".
    Blank lines are skipped. The file must be a regular UTF-8 file of at most
    MAX_CALIBRATION_BYTES; each JSONL line is parsed strictly (surgery.io.guards.decode_json).

    Raises:
        OptionError (field "calibration"): missing, not a regular file, unreadable, too large,
        not UTF-8, empty, or a JSONL line that is not an object with a string "text".

    Example:
        >>> read_calibration("texts.txt")[:2]                                      # doctest: +SKIP
        ['first sample', 'second sample']
    """
    p = Path(path)
    numbered = [(i + 1, ln) for i, ln in enumerate(_calibration_lines(p)) if ln.strip()]
    if not numbered:
        raise OptionError(f"calibration file {escape_name(p)} is empty; it needs one text sample per line",
                          field="calibration")
    jsonl = p.suffix in (".jsonl", ".json") or numbered[0][1].lstrip().startswith("{")
    if not jsonl:
        return [ln.strip() for _, ln in numbered]
    texts = _jsonl_texts(p, numbered)
    if not texts:
        raise OptionError(f"calibration file {escape_name(p)} has no non-empty \"text\" values", field="calibration")
    return texts


def _split(n: int, holdout: float, seed: int, where: str) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded permutation, at least one of each."""
    if n < MIN_SAMPLES:
        raise OptionError(f"calibration data {escape_name(where)} has {n} sample(s): too few; refine needs at least "
                          f"{MIN_SAMPLES} (hundreds are better)", field="calibration")
    n_hold = max(1, round(holdout * n))
    if n - n_hold < 1:
        raise OptionError(
            f"calibration data {escape_name(where)} has {n} sample(s): too few for a {holdout:g} hold-out split; "
            "give more samples (hundreds are better) or a smaller holdout", field="holdout",
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_hold:]), sorted(perm[:n_hold])


def _tokenizer(base: Path):
    if not (base / "tokenizer_config.json").is_file() and not (base / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{escape_name(base)}: no tokenizer (tokenizer.json / tokenizer_config.json); refine tokenises the "
            f"calibration text with the base model's tokenizer: copy it into {escape_name(base)}"
        )
    from transformers import AutoTokenizer

    try:
        with quiet():
            return AutoTokenizer.from_pretrained(str(base), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{escape_name(base)}: cannot load its tokenizer offline ({escape_name(first, 200)}); "
                              "fix or re-save it") from None


def _tokenize(tok, texts: Sequence[str], max_length: int) -> list[torch.Tensor]:
    with quiet():
        enc = tok(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    ids = [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]  # each (L_i,)
    empty = [i for i, x in enumerate(ids) if x.numel() == 0]
    if empty:
        raise OptionError(f"calibration sample {empty[0] + 1} tokenises to nothing; remove it", field="calibration")
    return ids


def _collate(ids: Sequence[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (b, L) ids and mask, padded to the batch's longest sample."""
    L = max(x.numel() for x in ids)
    out = torch.full((len(ids), L), pad_id, dtype=torch.long)  # (b, L)
    mask = torch.zeros(len(ids), L, dtype=torch.long)  # (b, L)
    for i, x in enumerate(ids):
        out[i, : x.numel()] = x
        mask[i, : x.numel()] = 1
    return out.to(device), mask.to(device)

# ----------------------------------------------------------------------------- models


def _architecture(path: Path) -> str:
    """The architecture named in a model directory's config.json ('AutoModel' when none is)."""
    idx = open_checkpoint(path)
    if idx.kind != "model":
        raise CheckpointError(f"{escape_name(path)}: is an adapter directory; give a model checkpoint directory")
    archs = config_dict(path, idx.config).get("architectures") or []
    return archs[0] if archs else "AutoModel"


def _load_model(path: Path, device: torch.device) -> nn.Module:
    """A frozen fp32 model in eval mode (dropout off, also while the factors train), eager attention."""
    model = load_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


@dataclass(frozen=True)
class _Objective:
    """The resolved objective: components, their weights, and the hidden-state layers "hidden" compares."""

    parts: tuple[str, ...]      # pooled | relational | hidden | logits-kl
    weights: tuple[float, ...]
    layers: tuple[int, ...] = ()  # indices into hidden_states (0 = embeddings), non-negative

    @property
    def name(self) -> str:
        return "+".join(self.parts)

    @property
    def needs_hidden(self) -> bool:
        return any(p != "logits-kl" for p in self.parts)


def _num_layers(cfg: Mapping[str, Any]) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    return None


def _resolve_layers(layers: tuple[int, ...] | None, cfg: Mapping[str, Any], base: Path) -> tuple[int, ...]:
    """Non-negative hidden_states indices (0 = embeddings, n = last layer): LAYERS, or the middle and the last."""
    n = _num_layers(cfg)
    if n is None:
        raise OptionError(f"{escape_name(base)}: config.json gives no layer count (num_hidden_layers); the hidden "
                          "objective cannot pick layers", field="objective")
    if layers is None:
        return tuple(sorted({n // 2, n}))
    bad = [v for v in layers if not -(n + 1) <= v <= n]
    if bad:
        raise OptionError(f"layer {bad[0]} is outside the model's hidden states 0..{n} (or -{n + 1}..-1)",
                          field="layers")
    return tuple(sorted({v % (n + 1) for v in layers}))


def _resolve_objective(opts: RefineOptions, arch: str, base: Path, cfg: Mapping[str, Any]) -> _Objective:
    causal = arch.endswith(_CAUSAL_SUFFIXES)
    parts = opts.components
    if parts == ("auto",):
        parts = ("logits-kl",) if causal else ("pooled",)
    if "logits-kl" in parts and not causal:
        raise OptionError(f"objective logits-kl needs a causal language model; {escape_name(base)} is "
                          f"{escape_name(arch)}; use pooled, relational or "
                          "hidden", field="objective")
    weights = tuple(float(w) for w in opts.weights) if opts.weights is not None else (1.0,) * len(parts)
    layers = _resolve_layers(opts.layers, cfg, base) if "hidden" in parts else ()
    return _Objective(parts, weights, layers)


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, obj: _Objective) -> dict[str, Any]:
    """What the objective compares: "logits" (b, L, V); "last" (b, L, d) and "states" (hidden_states)."""
    kw = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    if not obj.needs_hidden:
        out = model(input_ids=ids, attention_mask=mask, **kw)
        return {"logits": out.logits.float()}
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    h = getattr(out, "last_hidden_state", None)
    r: dict[str, Any] = {"last": (h if h is not None else out.hidden_states[-1]).float(), "states": out.hidden_states}
    if "logits-kl" in obj.parts:
        r["logits"] = out.logits.float()
    return r


def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-padding tokens, L2-normalised (sentence-transformers' mean pooling)."""
    m = mask.unsqueeze(-1).to(h.dtype)  # (b, L, 1)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (b, d)
    return F.normalize(e, dim=-1)


def _cache_keys(obj: _Objective) -> tuple[str, ...]:
    """Cache entries the components read: pooled (pooled, relational), hidden, logp."""
    want = {"pooled": "pooled", "relational": "pooled", "hidden": "hidden", "logits-kl": "logp"}
    return tuple(dict.fromkeys(want[p] for p in obj.parts))


def _target(out: Mapping[str, Any], mask: torch.Tensor, obj: _Objective) -> dict[str, list[torch.Tensor]]:
    """Per-sample cache entries from a teacher batch: (d,) pooled, (layers, L_i, d) hidden, (L_i, V) log-probs."""
    lens = mask.sum(1).tolist()
    b = mask.shape[0]
    r: dict[str, list[torch.Tensor]] = {}
    for key in _cache_keys(obj):
        if key == "pooled":
            r[key] = list(_pool(out["last"], mask).cpu())
        elif key == "hidden":
            hs = torch.stack([out["states"][k].float() for k in obj.layers], 1)  # (b, layers, L, d)
            r[key] = [hs[i, :, : lens[i]].cpu().clone() for i in range(b)]
        else:
            logp = F.log_softmax(out["logits"], dim=-1)
            r[key] = [logp[i, : lens[i]].cpu().clone() for i in range(b)]
    return r


def _padded(targets: Sequence[torch.Tensor], like: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-sample targets right-padded along their token AXIS into a zero tensor shaped LIKE."""
    t = torch.zeros_like(like)
    for i, x in enumerate(targets):
        t[i].narrow(axis, 0, x.shape[axis]).copy_(x.to(like.device))
    return t


def _component(part: str, out: Mapping[str, Any], mask: torch.Tensor, targets: Mapping[str, Sequence[torch.Tensor]],
               obj: _Objective) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(per-unit losses (graph), per-unit cosines or None, max abs diff) of one component.

    Units: samples (pooled, relational) or non-padding tokens (hidden, logits-kl)."""
    valid = mask.bool()  # (b, L)
    if part in ("pooled", "relational"):
        s = _pool(out["last"], mask)  # (b, d)
        t = torch.stack(list(targets["pooled"])).to(s.device)  # (b, d)
        if part == "pooled":
            cos = (s * t).sum(-1)  # (b,)
            return 1.0 - cos, cos.detach(), float((s - t).detach().abs().max())
        gap = s @ s.T - t @ t.T  # (b, b): in-batch cosine-similarity matrices
        return gap.pow(2).mean(-1), None, float(gap.detach().abs().max())
    if part == "hidden":
        s = torch.stack([out["states"][k].float() for k in obj.layers], 1)  # (b, layers, L, d)
        t = _padded(targets["hidden"], s, 1)
        err = (s - t).pow(2).mean(-1) / t.pow(2).mean(-1).clamp_min(1e-12)  # (b, layers, L) normalised MSE
        per = err.mean(1)[valid]  # (tokens,)
        cos = F.cosine_similarity(s, t, dim=-1).mean(1)[valid]
        return per, cos.detach(), float((s - t).detach().abs().amax(dim=(1, 3))[valid].max())
    logp = F.log_softmax(out["logits"], dim=-1)  # (b, L, V)
    t = _padded(targets["logp"], logp, 0)
    kl = (t.exp() * (t - logp)).sum(-1)[valid]  # (tokens,)  KL(teacher ‖ student)
    return kl, None, float((logp - t).detach().abs()[valid].max())


def _loss(out: Mapping[str, Any], mask: torch.Tensor, targets: Mapping[str, Sequence[torch.Tensor]],
          obj: _Objective) -> tuple[torch.Tensor, dict[str, tuple[float, float, int, float]]]:
    """(weighted loss (graph), {component: (sum of per-unit losses, sum of cosines, units, max abs diff)})."""
    total: torch.Tensor | None = None
    stats = {}
    for part, w in zip(obj.parts, obj.weights, strict=True):
        per, cos, diff = _component(part, out, mask, targets, obj)
        term = per.mean() if w == 1.0 else w * per.mean()
        total = term if total is None else total + term
        stats[part] = (float(per.detach().sum()), float(cos.sum()) if cos is not None else 0.0, per.numel(), diff)
    assert total is not None
    return total, stats


# ----------------------------------------------------------------------------- the LoRA forward


class _Lora(nn.Module):
    """One module's trainable factors, applied by a forward hook on the unchanged HF module.

    linear (Linear, and Conv1D whose weight is (in, out): PEFT's fan_in_fan_out only
    changes how the delta is *merged*, the forward is the same):  y += s·(x Aᵀ) Bᵀ
    embedding:  y += s·(Aᵀ[ids]) Bᵀ
    head (an output head tied to a LoRA'd input embedding; Δ_head = Δ_emb = s·(B A)ᵀ):
                y += s·(x B) A
    """

    def __init__(self, m: LoraModule, device, train_bias: bool = False):
        super().__init__()
        self.kind = m.kind
        self.A = nn.Parameter(m.A.detach().to(device=device, dtype=torch.float32).clone())  # (r, in|vocab)
        self.B = nn.Parameter(m.B.detach().to(device=device, dtype=torch.float32).clone())  # (out|dim, r)
        self.scaling = float(m.scaling)
        # lora_B.bias (out,): a trainable (unscaled) parameter, or a frozen pre-scaled buffer
        self.bias: nn.Parameter | None = None
        if train_bias and m.bias is not None:
            self.bias = nn.Parameter(m.bias.detach().to(device=device, dtype=torch.float32).clone())
        bias = None if m.bias is None or self.bias is not None else (
            m.bias.detach().to(device=device, dtype=torch.float32) * self.scaling)
        self.bias_delta: torch.Tensor | None
        self.register_buffer("bias_delta", bias, persistent=False)
        self.enabled = True
        self.padding_idx: int | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            after_a = F.embedding(x, self.A.T, padding_idx=self.padding_idx)  # (…, r)
            return self.scaling * (after_a @ self.B.T)  # (…, dim)
        d = self.scaling * ((x.to(self.A.dtype) @ self.A.T) @ self.B.T)  # (…, out)
        if self.bias is not None:
            return d + self.scaling * self.bias
        return d if self.bias_delta is None else d + self.bias_delta  # bias_delta is pre-scaled

    def head_delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * ((x.to(self.B.dtype) @ self.B) @ self.A)  # (…, vocab)

    def hook(self, _mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook on the adapted module: adds the delta while enabled."""
        return out + self.delta(args[0]) if self.enabled else out

    def head_hook(self, _mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook on an output head tied to this (embedding) LoRA's weight."""
        return out + self.head_delta(args[0]) if self.enabled else out


class _Tokens(nn.Module):
    """An embedding's trainable tokens (PEFT's trainable_token_indices): rows that replace the
    base's rows `ids`, by a forward hook on the unchanged embedding (and on an output head tied
    to it, whose logits of those ids then use the new rows, as in the merged model)."""

    def __init__(self, ids: Sequence[int], rows: torch.Tensor, weight: torch.Tensor, device):
        super().__init__()
        self.ids = torch.tensor(list(ids), dtype=torch.long, device=device)  # (k,)
        self.rows = nn.Parameter(rows.detach().to(device=device, dtype=torch.float32).clone())  # (k, dim)
        slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=device)
        slot[self.ids] = torch.arange(len(ids), device=device)
        self.slot = slot  # (vocab,): the row holding each id, -1 for the base's
        self.weight = weight  # the base embedding (frozen)
        self.enabled = True

    def hook(self, _mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return out
        s = self.slot[args[0]]  # (...,)
        return torch.where((s >= 0).unsqueeze(-1), self.rows[s.clamp(min=0)].to(out.dtype), out)

    def head_hook(self, _mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return out
        change = self.rows - self.weight[self.ids].detach().float()  # (k, dim)
        return out.index_add(-1, self.ids, (args[0].float() @ change.T).to(out.dtype))


class _Student:
    """BASE with the adapter's full tensors loaded and LoRA hooks attached."""

    def __init__(self, model: nn.Module, loras: Mapping[str, _Lora], handles: list,
                 vectors: Mapping[str, nn.Parameter] | None = None, tokens: Mapping[str, _Tokens] | None = None):
        self.model, self.loras, self.handles = model, loras, handles
        self.vectors = dict(vectors or {})  # trainable 1-D full tensors of the adapter, by base tensor name
        self.tokens = dict(tokens or {})  # trainable tokens by embedding module

    def named_params(self) -> list[tuple[tuple[str, str], nn.Parameter]]:
        """((slot, name), parameter): A / B / bias per LoRA module, then "full" 1-D tensors."""
        out: list[tuple[tuple[str, str], nn.Parameter]] = []
        for name, m in self.loras.items():
            out += [(("A", name), m.A), (("B", name), m.B)]
            if m.bias is not None:
                out.append((("bias", name), m.bias))
        out += [(("tokens", n), t.rows) for n, t in self.tokens.items()]
        return out + [(("full", n), p) for n, p in self.vectors.items()]

    def params(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_params()]

    def state(self) -> dict[tuple[str, str], torch.Tensor]:
        """A detached copy of every trained tensor (a checkpoint)."""
        return {k: p.detach().clone() for k, p in self.named_params()}

    @contextlib.contextmanager
    def disabled(self):
        hooked = [*self.loras.values(), *self.tokens.values()]
        for m in hooked:
            m.enabled = False
        try:
            yield
        finally:
            for m in hooked:
                m.enabled = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()




def _load_full_tensors(model: nn.Module, full: Mapping[str, torch.Tensor], where: str) -> None:
    """Full tensors (modules_to_save, lm_head/embedding copies) go into the frozen base as they are."""
    sd = model.state_dict(keep_vars=True)
    written: dict[int, tuple[str, torch.Tensor]] = {}
    for name, t in full.items():
        p = sd.get(name)
        if p is None:
            raise AdapterError(f"{escape_name(where)}: full tensor '{escape_name(name, 200)}' matches no tensor of "
                               "the base model; is the adapter for another model?")
        if tuple(p.shape) != tuple(t.shape):
            raise AdapterError(f"{escape_name(where)}: full tensor '{escape_name(name, 200)}' has shape "
                               f"{tuple(t.shape)} but the base has "
                               f"{tuple(p.shape)}; a resized vocabulary cannot be refined: merge it first")
        ptr = p.data_ptr()
        if ptr in written and not torch.equal(written[ptr][1], t):
            raise AdapterError(f"{escape_name(where)}: '{escape_name(written[ptr][0], 200)}' and "
                               f"'{escape_name(name, 200)}' share one tied tensor in the base but "
                               f"differ in the adapter; refine cannot untie them: merge first")
        with torch.no_grad():
            p.data.copy_(t.to(p.dtype))
        written[ptr] = (name, t)


def _target_module(model: nn.Module, name: str, m: LoraModule, where: str) -> nn.Module:
    """The base module a LoRA entry applies to, of the kind the adapter says."""
    from transformers.pytorch_utils import Conv1D

    if m.magnitude is not None:
        raise AdapterError(f"{escape_name(where)}: {escape_name(name, 200)} is DoRA (lora_magnitude_vector); refine "
                           "trains plain LoRA factors only")
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise AdapterError(f"{escape_name(where)}: LoRA module '{escape_name(name, 200)}' is not a module of the "
                           "base model (names follow the "
                           f"checkpoint); is the adapter for another model?") from None
    want = nn.Embedding if m.kind == "embedding" else (nn.Linear, Conv1D)
    if not isinstance(mod, want):
        raise AdapterError(f"{escape_name(where)}: {escape_name(name, 200)} is a {type(mod).__name__}, but the "
                           f"adapter holds a {m.kind} LoRA for it")
    return mod


def _make_lora(mod: nn.Module, name: str, m: LoraModule, where: str, device, train_bias: bool = False) -> _Lora:
    """Trainable fp32 factors for one module, checked against its shape."""
    from transformers.pytorch_utils import Conv1D

    lo = _Lora(m, device, train_bias)
    if isinstance(mod, nn.Embedding):
        lo.padding_idx = mod.padding_idx
        if tuple(lo.A.shape[1:]) != (mod.num_embeddings,) or lo.B.shape[0] != mod.embedding_dim:
            raise AdapterError(f"{escape_name(where)}: {escape_name(name, 200)}: A {tuple(lo.A.shape)} / B "
                               f"{tuple(lo.B.shape)} do not fit the "
                               f"embedding ({mod.num_embeddings}, {mod.embedding_dim})")
        return lo
    w = cast(torch.Tensor, mod.weight)  # Linear / Conv1D (checked by _target_module)
    out_f, in_f = (w.shape[1], w.shape[0]) if isinstance(mod, Conv1D) else tuple(w.shape)
    if lo.A.shape[1] != in_f or lo.B.shape[0] != out_f:
        raise AdapterError(f"{escape_name(where)}: {escape_name(name, 200)}: A {tuple(lo.A.shape)} / B "
                           f"{tuple(lo.B.shape)} do not fit the "
                           f"layer (out={out_f}, in={in_f})")
    return lo


def _tied_head(model: nn.Module, weight: torch.Tensor) -> nn.Linear | None:
    """The model's output head when it is a Linear sharing WEIGHT (an input embedding's), else None."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    return head if isinstance(head, nn.Linear) and head.weight is weight else None


def _tied_head_hooks(model: nn.Module, loras: Mapping[str, _Lora]) -> list:
    """An output head tied to a LoRA'd input embedding must see the same delta (the merged model has it)."""
    heads = [(head, lo) for name, lo in loras.items() if lo.kind == "embedding"
             and (head := _tied_head(model, cast(torch.Tensor, model.get_submodule(name).weight))) is not None]
    return [head.register_forward_hook(lo.head_hook) for head, lo in heads]


def _vector_params(model: nn.Module, full: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    """The base parameters holding the adapter's 1-D full tensors (biases, norm vectors), made trainable."""
    sd = model.state_dict(keep_vars=True)
    out = {}
    for name, t in full.items():
        p = sd.get(name)
        if t.dim() == 1 and isinstance(p, nn.Parameter) and p.is_floating_point():
            p.requires_grad_(True)
            out[name] = p
    return out


def _make_tokens(model: nn.Module, name: str, ids: Sequence[int], rows: torch.Tensor, where: str, device,
                 ) -> tuple[_Tokens, list]:
    """Trainable tokens on embedding NAME, checked against it; (module, forward-hook handles)."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        mod = None
    if not isinstance(mod, nn.Embedding):
        raise AdapterError(f"{escape_name(where)}: trainable tokens on '{escape_name(name, 200)}', which is not an "
                           "embedding of the base model; is the adapter for another model?")
    if rows.shape[1] != mod.embedding_dim or not all(0 <= i < mod.num_embeddings for i in ids):
        raise AdapterError(f"{escape_name(where)}: trainable tokens of {escape_name(name, 200)}: rows "
                           f"{tuple(rows.shape)} / ids up to {max(ids)} do not fit the embedding "
                           f"({mod.num_embeddings}, {mod.embedding_dim})")
    tok = _Tokens(ids, rows, mod.weight, device)
    handles = [mod.register_forward_hook(tok.hook)]
    head = _tied_head(model, mod.weight)
    if head is not None:
        handles.append(head.register_forward_hook(tok.head_hook))
    return tok, handles


def _attach(model: nn.Module, modules: Mapping[str, LoraModule], full: Mapping[str, torch.Tensor],
            where: str, device, train_vectors: bool = False,
            tokens: Mapping[str, tuple[list[int], torch.Tensor]] | None = None) -> _Student:
    """MODEL with the adapter's full tensors loaded, a LoRA forward hook on every adapted module and
    one on every embedding with trainable TOKENS; TRAIN_VECTORS: lora_B biases and 1-D full tensors
    become trainable too."""
    _load_full_tensors(model, full, where)
    loras: dict[str, _Lora] = {}
    handles = []
    for name, m in modules.items():
        mod = _target_module(model, name, m, where)
        loras[name] = _make_lora(mod, name, m, where, device, train_vectors)
        handles.append(mod.register_forward_hook(loras[name].hook))
    handles += _tied_head_hooks(model, loras)
    toks: dict[str, _Tokens] = {}
    for name, (ids, rows) in (tokens or {}).items():
        toks[name], more = _make_tokens(model, name, ids, rows, where, device)
        handles += more
    return _Student(model, loras, handles, _vector_params(model, full) if train_vectors else None, toks)


def load_student(base: str | Path, adapter: str | Path, device: str = "cpu") -> nn.Module:
    """BASE (fp32, eval) with ADAPTER applied by our own LoRA forward (no PEFT); for checks.

    Args:
        base: the base model directory the adapter was made for.
        adapter: a PEFT LoRA adapter directory.
        device: "cpu", "cuda", "cuda:N" or "auto".

    Returns:
        The model, frozen, with forward hooks adding each module's LoRA delta.

    Raises:
        CheckpointError / AdapterError: the base cannot be loaded, or the adapter does not fit it.
        OptionError: the device is unknown or unavailable.

    Example:
        >>> model = load_student("fixtures/tiny-bert", "out/lora-refined")
    """
    dev = resolve_device(device)
    _, modules, full, tokens = _read_lora(Path(adapter))
    model = _load_model(Path(base), dev)
    _attach(model, modules, full, str(adapter), dev, tokens=tokens)
    return model


# ----------------------------------------------------------------------------- helpers


def _progress_fn(progress: Progress | None):
    """Call progress with a postfix when it takes a 4th argument (cli.util.progress_bar does)."""
    if progress is None:
        return lambda *a: None
    try:
        sig = inspect.signature(progress)
        n = len([p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
        four = n >= 4 or any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    except (TypeError, ValueError):
        four = False
    if four:
        return lambda d, i, t, post=None: progress(d, i, t, post)
    return lambda d, i, t, post=None: progress(d, i, t)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to lr, then cosine decay to 0 at `steps` (step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * frac))



# ----------------------------------------------------------------------------- phases
# prepare (no model loaded: every cheap check) -> teacher cache (teacher released) -> student
# -> train (held-out scoring) -> save the best checkpoint. Each phase hands the next a value.


@dataclass
class _Data:
    """Tokenised calibration samples and their seeded train / held-out split."""

    ids: list[torch.Tensor]  # each (L_i,)
    pad_id: int
    train: list[int]
    hold: list[int]
    where: str  # the calibration file, or "(list)"

    def batch(self, idx: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        return _collate([self.ids[i] for i in idx], self.pad_id, device)  # (b, L), (b, L)


@dataclass
class _Setup:
    """What is settled before any model is loaded."""

    device: torch.device
    obj: _Objective
    data: _Data
    notes: list[str] = field(default_factory=list)

    @property
    def objective(self) -> str:
        return self.obj.name


@dataclass
class _Cache:
    """The teacher's side of the objective, per sample: (d,) pooled, (L_i, d) hidden, (L_i, V) log-probs."""

    targets: dict[str, list[torch.Tensor]]  # per cache key (pooled, hidden, logp), per sample
    nbytes: int

    def of(self, idx: Sequence[int]) -> dict[str, list[torch.Tensor]]:
        return {k: [v[i] for i in idx] for k, v in self.targets.items()}


@dataclass
class _Trained:
    """The training phase's outcome: held-out scores and the best checkpoint's factors."""

    no_adapter: EvalPoint
    before: EvalPoint
    best: EvalPoint
    best_state: dict[tuple[str, str], torch.Tensor]  # _Student.state() of the best checkpoint
    curve: list[EvalPoint]
    train_loss: list[tuple[int, float]]
    seconds: float
    eval_seconds: float
    steps_run: int = 0


def _calibration_texts(calibration) -> tuple[list[str], str]:
    """(samples, where) from a calibration file or a sequence of samples."""
    if isinstance(calibration, (str, Path)) or hasattr(calibration, "__fspath__"):
        return read_calibration(calibration), str(calibration)
    texts = [str(t) for t in calibration if str(t).strip()]
    if not texts:
        raise OptionError("calibration list is empty; give text samples", field="calibration")
    return texts, "(list)"


def _prepare(base: Path, teacher: Path, opts: RefineOptions) -> _Setup:
    """Device, architectures, objective and tokenised calibration data: every check that needs no model."""
    dev = resolve_device(opts.device)
    arch, t_arch = _architecture(base), _architecture(teacher)
    if t_arch != arch:
        raise CheckpointError(f"teacher {escape_name(teacher)} is {escape_name(t_arch)} but base {escape_name(base)} "
                              f"is {escape_name(arch)}; they must share an "
                              "architecture")
    cfg = config_dict(base, open_checkpoint(base).config)
    obj = _resolve_objective(opts, arch, base, cfg)
    texts, where = _calibration_texts(opts.calibration)
    train, hold = _split(len(texts), opts.holdout, opts.seed, where)
    tok = _tokenizer(base)
    max_length, notes = _max_length(opts.max_length, cfg, tok)
    ids = _tokenize(tok, texts, max_length)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return _Setup(dev, obj, _Data(ids, pad_id, train, hold, where), notes)


def _max_length(asked: int, cfg: Mapping[str, Any], tok) -> tuple[int, list[str]]:
    """(tokens per sample, notes): ASKED, lowered to the model's position limit (config or tokenizer)."""
    limits = [int(cfg[k]) for k in ("max_position_embeddings", "n_positions", "n_ctx")
              if isinstance(cfg.get(k), int) and cfg[k] > 0]
    tok_max = getattr(tok, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 10**7:
        limits.append(tok_max)
    limit = min(limits) if limits else asked
    if asked <= limit:
        return asked, []
    return limit, [f"max_length {asked} is above the model's {limit} positions; samples are truncated to "
                   f"{limit} tokens"]


def _teacher_cache(teacher: Path, setup: _Setup, batch_size: int, emit) -> _Cache:
    """The teacher's outputs on every sample, computed once; the teacher is released on return,
    before the student is loaded (peak memory: one model + the cache)."""
    model = _load_model(teacher, setup.device)
    data, obj = setup.data, setup.obj
    targets = {k: [torch.empty(0)] * len(data.ids) for k in _cache_keys(obj)}  # order covers all samples
    order = data.hold + data.train
    nbytes = 0
    with torch.no_grad():
        for k in range(0, len(order), batch_size):
            chunk = order[k: k + batch_size]
            x, m = data.batch(chunk, setup.device)
            for key, per in _target(_forward(model, x, m, obj), m, obj).items():
                for i, t in zip(chunk, per, strict=True):
                    targets[key][i] = t
                    nbytes += t.numel() * t.element_size()
            if nbytes > _CACHE_LIMIT:
                raise OptionError(
                    f"cached teacher outputs exceed {_CACHE_LIMIT / 2**30:.0f} GiB after {k + len(chunk)} samples "
                    f"({obj.name}); use fewer calibration samples or a smaller max_length", field="max_length")
            emit("teacher", min(k + batch_size, len(order)), len(order))
    return _Cache(targets, nbytes)


def _evaluate(model: nn.Module, data: _Data, cache: _Cache, obj: _Objective, batch_size: int, step: int,
              device) -> EvalPoint:
    """MODEL's error against the cached teacher outputs, over the held-out samples."""
    acc = {p: [0.0, 0.0, 0, 0.0] for p in obj.parts}  # loss sum, cosine sum, units, max abs diff
    with torch.no_grad():
        for k in range(0, len(data.hold), batch_size):
            chunk = data.hold[k: k + batch_size]
            x, m = data.batch(chunk, device)
            _, stats = _loss(_forward(model, x, m, obj), m, cache.of(chunk), obj)
            for p, (s, c, u, d) in stats.items():
                a = acc[p]
                a[0], a[1], a[2], a[3] = a[0] + s, a[1] + c, a[2] + u, max(a[3], d)
    parts = {p: a[0] / max(a[2], 1) for p, a in acc.items()}
    loss = sum(parts[p] if w == 1.0 else w * parts[p] for p, w in zip(obj.parts, obj.weights, strict=True))
    cos_part = next((p for p in obj.parts if p in ("pooled", "hidden")), None)
    cosine = acc[cos_part][1] / max(acc[cos_part][2], 1) if cos_part else None
    return EvalPoint(step, loss, cosine, parts.get("logits-kl"), max(a[3] for a in acc.values()), parts)


def _batch_stream(train: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Training batches: the train samples in seeded random order, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while True:
        if len(stream) < min(batch_size, len(train)):
            stream += [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
        chunk, stream = stream[:batch_size], stream[batch_size:]
        yield chunk


def _train_step(student: _Student, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor],
                targets: Mapping[str, list[torch.Tensor]], obj: _Objective, lr: float, step: int) -> float:
    """One AdamW step at learning rate LR; returns the batch loss."""
    x, m = batch
    loss, _ = _loss(_forward(student.model, x, m, obj), m, targets, obj)
    if not torch.isfinite(loss.detach()):
        raise SurgeryError(f"refine loss became {float(loss.detach())} at step {step + 1}; lower lr "
                           f"(now {opt.defaults['lr']:g}); nothing was written")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.params(), 1.0)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    opt.step()
    return float(loss.detach())


#: learning-rate factor of the 1-D deltas (biases, norms): Adam moves every entry by ~lr per step, which
#: for a vector that shifts every token's output at once is far hotter than for a factor entry
VECTOR_LR_SCALE = 0.1


def _param_groups(student: _Student) -> list[dict[str, Any]]:
    """AdamW groups: the factors at lr, the 1-D deltas and token rows at VECTOR_LR_SCALE · lr (a row
    holds the absolute values of every use of its token, like a vector)."""
    named = student.named_params()
    factors = [p for (slot, _), p in named if slot in ("A", "B")]
    vectors = [p for (slot, _), p in named if slot not in ("A", "B")]
    groups: list[dict[str, Any]] = [{"params": factors, "lr_scale": 1.0}]
    if vectors:
        groups.append({"params": vectors, "lr_scale": VECTOR_LR_SCALE})
    return groups


def _train(student: _Student, setup: _Setup, cache: _Cache, opts: RefineOptions, emit) -> _Trained:
    """Train the factors; score the held-out samples every eval_interval steps; keep the best;
    stop early after `patience` scorings without improvement."""
    data, obj, dev, bs = setup.data, setup.obj, setup.device, opts.batch_size
    with student.disabled():
        no_adapter = _evaluate(student.model, data, cache, obj, bs, 0, dev)
    before = _evaluate(student.model, data, cache, obj, bs, 0, dev)
    curve, train_loss = [before], []
    best, best_state, stale = before, student.state(), 0
    opt = torch.optim.AdamW(_param_groups(student), lr=opts.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    every, warmup = opts.eval_interval, opts.warmup_steps
    run_loss, run_n, done = 0.0, 0, 0
    t_train, t_eval = time.perf_counter(), 0.0
    emit("refine", 0, opts.steps, f"held-out {before.loss:.4g}")
    for step, chunk in zip(range(opts.steps), _batch_stream(data.train, bs, opts.seed), strict=False):
        lr = _lr_at(step, opts.steps, opts.lr, warmup)
        loss = _train_step(student, opt, data.batch(chunk, dev), cache.of(chunk), obj, lr, step)
        run_loss, run_n, done = run_loss + loss, run_n + 1, step + 1
        if done % every == 0 or done == opts.steps:
            te = time.perf_counter()
            point = _evaluate(student.model, data, cache, obj, bs, done, dev)
            t_eval += time.perf_counter() - te
            curve.append(point)
            train_loss.append((done, run_loss / run_n))
            run_loss, run_n = 0.0, 0
            if point.loss < best.loss:  # ties keep the earlier checkpoint (lr 0 keeps the input)
                best, best_state, stale = point, student.state(), 0
            else:
                stale += 1
        emit("refine", done, opts.steps, f"loss {loss:.4g} held-out {curve[-1].loss:.4g}")
        if opts.patience is not None and stale >= opts.patience:
            break
    return _Trained(no_adapter, before, best, best_state, curve, train_loss, time.perf_counter() - t_train, t_eval,
                    done)


def _save(out: Path, cfg: LoraAdapterConfig, modules: Mapping[str, LoraModule], full: Mapping[str, torch.Tensor],
          state: Mapping[tuple[str, str], torch.Tensor], overwrite: bool, inputs: list[Path],
          tokens: Mapping[str, tuple[list[int], torch.Tensor]] | None = None) -> None:
    """The refined adapter: the input's modules, ranks, scales, config fields, token ids; new factors
    and token rows (and trained 1-D deltas) from STATE, in their input dtypes."""
    def trained(slot: str, name: str, like: torch.Tensor) -> torch.Tensor:
        return state[(slot, name)].cpu().to(like.dtype).contiguous()

    refined: dict[str, LoraModule] = {}
    for name, m in modules.items():
        bias = trained("bias", name, m.bias) if m.bias is not None and ("bias", name) in state else m.bias
        refined[name] = LoraModule(name, m.kind, trained("A", name, m.A), trained("B", name, m.B), bias, None,
                                   m.scaling)
    full = {n: trained("full", n, t) if ("full", n) in state else t for n, t in full.items()}
    extra = {k: v for k, v in cfg.raw.items() if k not in _CONFIG_COMPUTED and k != "bias"}
    whole, biases = _split_biases(cfg, full)
    rows = {n: (ids, trained("tokens", n, t)) for n, (ids, t) in (tokens or {}).items()}
    write_adapter(out, refined, full_tensors=whole, base_model_name_or_path=cfg.base_model_name_or_path,
                  task_type=cfg.task_type, fan_in_fan_out=bool(cfg.fan_in_fan_out), extra_config=extra,
                  overwrite=overwrite, inputs=inputs, bias_tensors=biases or None, trainable_tokens=rows or None)


def _split_biases(cfg: LoraAdapterConfig, full: Mapping[str, torch.Tensor],
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapter's whole tensors split into modules_to_save tensors and PEFT bias='all' /
    'lora_only' biases (saved under their own module, which may also carry a LoRA)."""
    mts = [str(m) for m in cfg.raw.get("modules_to_save") or []]
    if cfg.raw.get("bias", "none") == "none":
        return dict(full), {}
    whole: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for name, t in full.items():
        owner = name.rsplit(".", 1)[0]
        in_mts = any(owner == m or owner.endswith("." + m) for m in mts)
        (biases if name.endswith(".bias") and not in_mts else whole)[name] = t
    return whole, biases


# ----------------------------------------------------------------------------- refine


def _result_options(opts: RefineOptions, setup: _Setup) -> dict[str, Any]:
    """The options as they were applied (defaults resolved), for the report."""
    return {**opts.to_json(), "objective": setup.objective, "eval_every": opts.eval_interval,
            "warmup": opts.warmup_steps, "device": str(setup.device),
            "threads": opts.threads or torch.get_num_threads(), "calibration": setup.data.where}


def _read_lora(adapter: Path) -> tuple[LoraAdapterConfig, dict[str, LoraModule], dict[str, torch.Tensor],
                                       dict[str, tuple[list[int], torch.Tensor]]]:
    """(config, LoRA modules, full tensors, trainable tokens {embedding: (ids, rows)})."""
    cfg, modules, full = read_adapter(adapter, allow=("trainable_token_indices",))
    if cfg.use_dora:
        raise AdapterError(f"{escape_name(adapter)}: DoRA adapter; refine trains plain LoRA factors only")
    tokens, full = split_token_rows(cfg, full, escape_name(adapter))
    return cfg, modules, full, tokens


def _base_shape(index, name: str) -> tuple[int, ...] | None:
    """The checkpoint shape of tensor NAME (exact, or one side carrying a model prefix the other lacks)."""
    t = index.tensors.get(name)
    if t is None:
        hits = [v for k, v in index.tensors.items() if k.endswith("." + name) or name.endswith("." + k)]
        t = hits[0] if len(hits) == 1 else None
    return tuple(t.shape) if t is not None else None


def _check_fits_base(base: Path, modules: Mapping[str, LoraModule], where: Path,
                     tokens: Mapping[str, tuple[list[int], torch.Tensor]] | None = None) -> None:
    """Refuse, before any model is loaded, an adapter whose targets or ranks do not fit BASE's weights.

    Raises:
        AdapterError: a LoRA module naming no weight of BASE, factors whose shapes do not fit it,
            trainable tokens whose ids or rows do not fit the embedding.
    """
    index = open_checkpoint(base)
    for name, (ids, rows) in (tokens or {}).items():
        shape = _base_shape(index, name + ".weight")
        if shape is None or len(shape) != 2 or rows.shape[1] != shape[1] or not all(0 <= i < shape[0] for i in ids):
            raise AdapterError(f"{escape_name(where)}: trainable tokens of '{escape_name(name, 200)}' (rows "
                               f"{tuple(rows.shape)}, ids up to {max(ids, default=0)}) do not fit the base "
                               f"weight {shape}; is the adapter for another model?")
    tied = set(index.tied) | set(index.tied.values())
    for name, m in modules.items():
        shape = _base_shape(index, name + ".weight")
        if shape is None:
            if name + ".weight" in tied:
                continue
            raise AdapterError(f"{escape_name(where)}: LoRA target '{escape_name(name, 200)}' has no weight in base "
                               f"{escape_name(base)}; is the adapter for another model?")
        r, fan_in = tuple(m.A.shape)
        fan_out, r_b = tuple(m.B.shape)
        fits = (fan_in, fan_out) == shape if m.kind == "embedding" else shape in ((fan_out, fan_in), (fan_in, fan_out))
        if r != r_b or not fits:
            raise AdapterError(f"{escape_name(where)}: {escape_name(name, 200)}: rank-{r} factors A "
                               f"{tuple(m.A.shape)} / "
                               f"B {tuple(m.B.shape)} do not fit the base weight {shape}; is the adapter for another "
                               "model?")


@dataclass(frozen=True)
class _Paths:
    """Where a refine reads and writes."""

    base: Path
    adapter: Path
    teacher: Path
    out: Path
    inputs: tuple[Path, ...]  # everything read (calibration file included): never written, never inside OUT
    report: Path | None = None  # the JSON report, written with OUT or not at all


def _paths(base: Path, adapter: Path, teacher: Path, out: Path, opts: RefineOptions,
           report: str | Path | None, reads: tuple[Path, ...]) -> _Paths:
    """Every path settled and checked before any work: OUT and REPORT against every input
    (READS, and the calibration file) and against each other."""
    calibration = opts.calibration
    cal = (Path(calibration),) if isinstance(calibration, (str, os.PathLike)) else ()
    inputs = reads + cal
    check_output_path(out, opts.overwrite, list(inputs))
    rpath = None
    if report is not None:
        rpath = check_output_file(report, inputs=inputs, others=[out], overwrite=opts.overwrite)
    return _Paths(base, adapter, teacher, out, inputs, rpath)


def _refine(paths: _Paths, lora: tuple, opts: RefineOptions, setup: _Setup, progress: Progress | None,
            t0: float) -> RefineResult:
    """The phases after _prepare: teacher cache -> student -> train -> save. LORA: _read_lora(ADAPTER)."""
    cfg, modules, full, tokens = lora
    emit = _progress_fn(progress)
    applied = _result_options(opts, setup)
    dev = setup.device
    with torch_threads(opts.threads), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(opts.seed)
        cache = _teacher_cache(paths.teacher, setup, opts.batch_size, emit)
        student = _attach(_load_model(paths.base, dev), modules, full, str(paths.adapter), dev, opts.train_vectors,
                          tokens)
        trained = _train(student, setup, cache, opts, emit)
        student.remove()
        trainable = sum(p.numel() for p in student.params())
        del student
    result = RefineResult(
        out=paths.out, objective=setup.objective, steps=opts.steps, best_step=trained.best.step,
        train_samples=len(setup.data.train), holdout_samples=len(setup.data.hold), trainable_params=trainable,
        no_adapter=trained.no_adapter, before=trained.before, after=trained.best, curve=trained.curve,
        train_loss=trained.train_loss, cache_bytes=cache.nbytes, seconds=time.perf_counter() - t0,
        train_seconds=trained.seconds, eval_seconds=trained.eval_seconds, options=applied,
        notes=list(setup.notes), steps_run=trained.steps_run, device=str(dev),
    )
    # the report is written first (a full disk fails here, before OUT is touched) and moved in with OUT
    report = json.dumps(result.to_json(), indent=2) + "\n"
    with staged_text(paths.report, report) if paths.report is not None else contextlib.nullcontext():
        _save(paths.out, cfg, modules, full, trained.best_state, opts.overwrite, list(paths.inputs), tokens)
    _write_card(result, cfg, paths, opts)
    return result


def _write_card(result: RefineResult, cfg: LoraAdapterConfig, paths: Any, opts: RefineOptions) -> None:
    """The refined adapter's model card (README.md), written into the finished directory."""
    from surgery.report.cards import options_dict, write_card

    summary = {"objective": result.objective, "steps run": result.steps_run, "best step": result.best_step,
               "held-out loss without the adapter": f"{result.no_adapter.loss:.4g}",
               "held-out loss before refine": f"{result.before.loss:.4g}",
               "held-out loss after refine": f"{result.after.loss:.4g}"}
    base = cfg.base_model_name_or_path or str(paths.base)
    write_card(paths.out, "refine", base, options_dict(opts), summary, inputs=list(paths.inputs), tags=["lora"])


def refine_adapter(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    options: RefineOptions | None = None,
    *,
    teacher: str | Path,
    progress: Progress | None = None,
    report: str | Path | None = None,
    **fields: Any,
) -> RefineResult:
    """Train ADAPTER's LoRA factors so that BASE + adapter reproduces TEACHER on calibration text.

    Writes a PEFT LoRA adapter with the same modules, ranks, scales, full tensors and config
    to OUT (atomically), holding the factors of the best held-out checkpoint (step 0 = the
    adapter as given). Inputs are never modified.

    Args:
        base: the base model directory (its tokenizer tokenises the calibration text).
        adapter: the LoRA adapter to refine (ours or PEFT's; not DoRA).
        out: the refined adapter directory to write.
        options: a RefineOptions; None builds one from FIELDS.
        teacher: the model to imitate (the fine-tune); same architecture as BASE.
        progress: callback(desc, done, total[, postfix]).
        report: also write the result as JSON (RefineResult.to_json()) to this file, together
            with OUT: it lands only if OUT does, and a full disk is found before OUT is written.
        **fields: RefineOptions fields (calibration=..., steps=..., ...), replacing those of OPTIONS.

    Returns:
        RefineResult: held-out scores (no adapter, the input, the saved checkpoint), the curve.

    Raises:
        OptionError: a bad option (naming its field), or calibration data that cannot be used.
        CheckpointError / AdapterError: BASE, TEACHER or ADAPTER cannot be loaded or do not fit.
        OutputError: OUT or REPORT exists (without overwrite), is or lies inside an input (the
            calibration file counts), or they overlap; checked before any work.
        SurgeryError: the loss became non-finite (nothing is written).

    Example:
        >>> res = refine_adapter("base/", "lora/", "lora-refined/", teacher="ft/",
        ...                      calibration="texts.txt", steps=300)
        >>> res.after.loss < res.before.loss
        True
    """
    t0 = time.perf_counter()
    opts = RefineOptions.build(options, **fields)
    base, adapter, teacher, out = Path(base), Path(adapter), Path(teacher), Path(out)
    paths = _paths(base, adapter, teacher, out, opts, report, (base, adapter, teacher))
    lora = _read_lora(adapter)  # a bad adapter fails before the calibration text is tokenised
    _check_fits_base(base, lora[1], adapter, lora[3])  # ... and before any model is loaded or trained
    setup = _prepare(base, teacher, opts)
    return _refine(paths, lora, opts, setup, progress, t0)


def extract_and_refine(
    base: str | Path,
    ft: str | Path,
    out: str | Path,
    options: RefineOptions | None = None,
    *,
    extract: Callable[[Path], Any] | Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    **fields: Any,
) -> tuple[Any, RefineResult]:
    """Extract a LoRA adapter from FT - BASE, then refine it with FT as the teacher, into OUT.

    The extraction goes to a temporary directory beside OUT, removed afterwards; OUT appears
    only when both steps succeed. Every cheap refine check (calibration, objective, tokenizer,
    device) runs before the extraction.

    Args:
        base, ft: the base model and its fine-tune (the teacher).
        out: the refined adapter directory to write.
        options: a RefineOptions; None builds one from FIELDS.
        extract: how to extract: a callable writing the adapter to the directory it is given and
            returning its ExtractResult, or extract_lora's keyword options (None: its defaults).
        progress: callback(desc, done, total[, postfix]), passed to both steps.
        **fields: RefineOptions fields, replacing those of OPTIONS.

    Returns:
        (ExtractResult with .out set to OUT, RefineResult).

    Raises:
        what extract_lora and refine_adapter raise; SurgeryError when no temporary directory
        can be made beside OUT.

    Example:
        >>> ex, res = extract_and_refine("base/", "ft/", "lora/", calibration="texts.txt",
        ...                              extract={"rank": 8})
    """
    opts = RefineOptions.build(options, **fields)
    base, ft, out = Path(base), Path(ft), Path(out)
    paths = _paths(base, base, ft, out, opts, None, (base, ft))  # the adapter is set once extracted
    setup = _prepare(base, ft, opts)  # bad calibration text fails before the SVDs
    run_extract = extract if callable(extract) else _extract_lora(base, ft, dict(extract or {}), progress)
    missing = [d for d in out.parents if not d.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.extract-", dir=out.parent))
    except OSError as e:
        _remove_empty(missing)
        raise SurgeryError(f"cannot create a temporary directory beside {escape_name(out)} "
                           f"({e.strerror or e})") from None
    try:
        ex = run_extract(tmp / "adapter")
        t0 = time.perf_counter()
        paths = dataclasses.replace(paths, adapter=tmp / "adapter")
        res = _refine(paths, _read_lora(tmp / "adapter"), opts, setup, progress, t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(missing)  # the parents made for OUT, as the writer does on failure
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return dataclasses.replace(ex, out=out), res


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the directories created for an output that did not land, deepest first (not if filled)."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


def _extract_lora(base: Path, ft: Path, kwargs: dict[str, Any], progress: Progress | None):
    def run(where: Path):
        from surgery.ops.extract import extract_lora

        return extract_lora(base, ft, where, progress=progress, **kwargs)

    return run


__all__ = ["EvalPoint", "RefineResult", "RefineOptions", "read_calibration", "refine_adapter",
           "extract_and_refine", "load_student", "OBJECTIVES"]
