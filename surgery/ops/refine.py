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
  hidden     MSE of the last hidden state over non-padding tokens
  logits-kl  KL(teacher ‖ student) of the next-token distributions over non-padding
             tokens                                                    causal LMs (default)

Training: AdamW (no weight decay: decay would pull the factors toward a zero delta),
linear warm-up then cosine decay, gradient clipping at 1.0, dropout off
(model.eval()), batches drawn by a seeded generator: the same inputs, seed and
thread count give the same adapter bytes.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import AdapterError, CheckpointError, OptionError, SurgeryError
from surgery.io import check_output_path, open_checkpoint
from surgery.core.peft_format import LoraModule, read_adapter, write_adapter

Progress = Callable[..., None]  # (desc, done, total[, postfix])
OBJECTIVES = ("auto", "pooled", "hidden", "logits-kl")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_CACHE_LIMIT = 8 * 2**30  # bytes of cached teacher outputs before we refuse (logits are vocab-sized)
_CONFIG_COMPUTED = ("peft_type", "bias", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules",
                    "lora_bias", "use_dora", "use_rslora", "modules_to_save", "fan_in_fan_out", "task_type",
                    "base_model_name_or_path")


# ----------------------------------------------------------------------------- results


@dataclass
class EvalPoint:
    """Held-out error of the student against the teacher at one step."""

    step: int
    loss: float                # the objective, averaged over the hold-out
    cosine: float | None       # pooled / hidden: mean cosine with the teacher's output
    kl: float | None           # logits-kl: mean KL per token
    max_abs_diff: float        # over the hold-out: embeddings / hidden states / log-probabilities


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

    @property
    def seconds_per_100_steps(self) -> float:
        """Training speed without the held-out scoring."""
        return 100 * (self.train_seconds - self.eval_seconds) / self.steps if self.steps else 0.0

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
        d["gap_closed_before"] = 1.0 - self.before.loss / self.no_adapter.loss if self.no_adapter.loss > 0 else 1.0
        return d


# ----------------------------------------------------------------------------- calibration data


def read_calibration(path: str | Path) -> list[str]:
    """Samples of a calibration file: one per line, or JSONL objects with a "text" field.

    JSONL is recognised by a .jsonl/.json suffix or a first non-blank line starting with "{".
    Blank lines are skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"calibration file {p} not found; give a text file (one sample per line) or JSONL with \"text\"")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise OptionError(f"calibration file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise OptionError(f"cannot read calibration file {p} ({e.strerror or e})") from None
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if not numbered:
        raise OptionError(f"calibration file {p} is empty; it needs one text sample per line")
    jsonl = p.suffix in (".jsonl", ".json") or numbered[0][1].lstrip().startswith("{")
    if not jsonl:
        return [ln.strip() for _, ln in numbered]
    texts = []
    for no, ln in numbered:
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise OptionError(f"{p}:{no}: not valid JSON ({e.msg}); JSONL needs one object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise OptionError(f"{p}:{no}: expected an object with a string \"text\" field")
        if obj["text"].strip():
            texts.append(obj["text"])
    if not texts:
        raise OptionError(f"calibration file {p} has no non-empty \"text\" values")
    return texts


def _split(n: int, holdout: float, seed: int, where: str) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded permutation, at least one of each."""
    n_hold = max(1, round(holdout * n))
    if n - n_hold < 1:
        raise OptionError(
            f"calibration data {where} has {n} sample(s): too few for a {holdout:g} hold-out split; "
            "give more samples (hundreds are better) or a smaller --holdout"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_hold:]), sorted(perm[:n_hold])


def _tokenizer(base: Path):
    if not (base / "tokenizer_config.json").is_file() and not (base / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{base}: no tokenizer (tokenizer.json / tokenizer_config.json); refine tokenises the calibration "
            f"text with the base model's tokenizer: copy it into {base}"
        )
    from transformers import AutoTokenizer

    try:
        with _quiet():
            return AutoTokenizer.from_pretrained(str(base), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{base}: cannot load its tokenizer offline ({first}); fix or re-save it") from None


def _tokenize(tok, texts: Sequence[str], max_length: int) -> list[torch.Tensor]:
    with _quiet():
        enc = tok(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    ids = [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]  # each (L_i,)
    empty = [i for i, x in enumerate(ids) if x.numel() == 0]
    if empty:
        raise OptionError(f"calibration sample {empty[0] + 1} tokenises to nothing; remove it")
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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers logs load reports and warnings; the library never prints."""
    import transformers.utils.logging as tlog

    verbosity = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    try:
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _model_class(path: Path):
    idx = open_checkpoint(path)
    if idx.kind != "model":
        raise CheckpointError(f"{path}: is an adapter directory; give a model checkpoint directory")
    cfg = idx.config
    if not cfg or not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; refine runs the model and needs a Hugging Face model directory")
    if cfg.get("auto_map"):
        raise CheckpointError(f"{path}: the model needs custom code (auto_map); refine never runs remote code")
    import transformers

    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    # The architecture class keeps the checkpoint's tensor names (an adapter's module names).
    return cls or transformers.AutoModel, (archs[0] if archs else "AutoModel")


def _load_model(path: Path, device: torch.device) -> nn.Module:
    cls, arch = _model_class(path)
    try:
        with _quiet():
            model, info = cls.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                              trust_remote_code=False, attn_implementation="eager",
                                              output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot load {path} as {arch} with transformers ({first})") from None
    # transformers fills missing weights with random values and only logs it: refuse instead
    bad = list(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight(s) of {arch} are missing or mis-shaped in the checkpoint "
                              f"(e.g. {bad[0]}); transformers would initialise them randomly")
    model.eval()  # dropout off, also while the factors train
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def _resolve_objective(objective: str, arch: str, base: Path) -> str:
    causal = arch.endswith(_CAUSAL_SUFFIXES)
    if objective == "auto":
        return "logits-kl" if causal else "pooled"
    if objective == "logits-kl" and not causal:
        raise OptionError(
            f"--objective logits-kl needs a causal language model; {base} is {arch}; use pooled or hidden"
        )
    return objective


def _forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, objective: str) -> torch.Tensor:
    """The output the objective compares: logits (b, L, V) or last hidden states (b, L, d)."""
    kw = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    if objective == "logits-kl":
        out = model(input_ids=ids, attention_mask=mask, **kw)
        return out.logits.float()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    h = getattr(out, "last_hidden_state", None)
    return (h if h is not None else out.hidden_states[-1]).float()


def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-padding tokens, L2-normalised (sentence-transformers' mean pooling)."""
    m = mask.unsqueeze(-1).to(h.dtype)  # (b, L, 1)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (b, d)
    return F.normalize(e, dim=-1)


def _target(out: torch.Tensor, mask: torch.Tensor, objective: str) -> list[torch.Tensor]:
    """Per-sample cache entries from a teacher batch."""
    if objective == "pooled":
        return list(_pool(out, mask).cpu())  # each (d,)
    lens = mask.sum(1).tolist()
    if objective == "logits-kl":
        out = F.log_softmax(out, dim=-1)
    return [out[i, : lens[i]].cpu().clone() for i in range(out.shape[0])]  # each (L_i, d|V)


def _loss(out: torch.Tensor, mask: torch.Tensor, targets: Sequence[torch.Tensor], objective: str):
    """(mean loss (graph), stats) of a student batch against cached teacher targets.

    stats: sum of per-unit losses, sum of cosines, unit count, max abs diff — units are
    samples (pooled) or tokens (hidden, logits-kl), so held-out means are exact over batches.
    """
    dev = out.device
    if objective == "pooled":
        s = _pool(out, mask)  # (b, d)
        t = torch.stack(list(targets)).to(dev)  # (b, d)
        cos = (s * t).sum(-1)  # (b,)
        per = 1.0 - cos
        diff = (s - t).detach().abs().max()
        return per.mean(), (float(per.detach().sum()), float(cos.detach().sum()), per.numel(), float(diff))
    t = torch.zeros_like(out)  # (b, L, d|V)
    for i, x in enumerate(targets):
        t[i, : x.shape[0]] = x.to(dev)
    valid = mask.bool()  # (b, L)
    if objective == "hidden":
        per = (out - t).pow(2).mean(-1)[valid]  # (tokens,)
        cos = F.cosine_similarity(out, t, dim=-1)[valid]  # (tokens,)
        diff = (out - t).abs()[valid].max()
        return per.mean(), (float(per.detach().sum()), float(cos.detach().sum()), per.numel(), float(diff.detach()))
    logp = F.log_softmax(out, dim=-1)  # (b, L, V)
    kl = (t.exp() * (t - logp)).sum(-1)[valid]  # (tokens,)  KL(teacher ‖ student)
    diff = (logp - t).abs()[valid].max()
    return kl.mean(), (float(kl.detach().sum()), 0.0, kl.numel(), float(diff.detach()))


# ----------------------------------------------------------------------------- the LoRA forward


class _Lora(nn.Module):
    """One module's trainable factors, applied by a forward hook on the unchanged HF module.

    linear (Linear, and Conv1D whose weight is (in, out): PEFT's fan_in_fan_out only
    changes how the delta is *merged*, the forward is the same):  y += s·(x Aᵀ) Bᵀ
    embedding:  y += s·(Aᵀ[ids]) Bᵀ
    head (an output head tied to a LoRA'd input embedding; Δ_head = Δ_emb = s·(B A)ᵀ):
                y += s·(x B) A
    """

    def __init__(self, m: LoraModule, device):
        super().__init__()
        self.kind = m.kind
        self.A = nn.Parameter(m.A.detach().to(device=device, dtype=torch.float32).clone())  # (r, in|vocab)
        self.B = nn.Parameter(m.B.detach().to(device=device, dtype=torch.float32).clone())  # (out|dim, r)
        self.scaling = float(m.scaling)
        bias = None if m.bias is None else m.bias.detach().to(device=device, dtype=torch.float32) * self.scaling
        self.register_buffer("bias_delta", bias, persistent=False)  # (out,) frozen, as extract decided
        self.enabled = True
        self.padding_idx = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            after_a = F.embedding(x, self.A.T, padding_idx=self.padding_idx)  # (…, r)
            return self.scaling * (after_a @ self.B.T)  # (…, dim)
        d = self.scaling * ((x.to(self.A.dtype) @ self.A.T) @ self.B.T)  # (…, out)
        return d if self.bias_delta is None else d + self.bias_delta  # bias_delta is pre-scaled

    def head_delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * ((x.to(self.B.dtype) @ self.B) @ self.A)  # (…, vocab)


class _Student:
    """BASE with the adapter's full tensors loaded and LoRA hooks attached."""

    def __init__(self, model: nn.Module, loras: dict[str, _Lora], handles: list):
        self.model, self.loras, self.handles = model, loras, handles

    def params(self) -> list[nn.Parameter]:
        return [p for m in self.loras.values() for p in (m.A, m.B)]

    @contextlib.contextmanager
    def disabled(self):
        for m in self.loras.values():
            m.enabled = False
        try:
            yield
        finally:
            for m in self.loras.values():
                m.enabled = True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _attach(model: nn.Module, modules: dict[str, LoraModule], full: dict[str, torch.Tensor],
            where: str, device) -> _Student:
    from transformers.pytorch_utils import Conv1D

    # full tensors (modules_to_save, lm_head/embedding copies): into the frozen base
    sd = model.state_dict(keep_vars=True)
    written: dict[int, tuple[str, torch.Tensor]] = {}
    for name, t in full.items():
        p = sd.get(name)
        if p is None:
            raise AdapterError(f"{where}: full tensor {name!r} matches no tensor of the base model; is the adapter "
                               f"for another model?")
        if tuple(p.shape) != tuple(t.shape):
            raise AdapterError(f"{where}: full tensor {name!r} has shape {tuple(t.shape)} but the base has "
                               f"{tuple(p.shape)}; a resized vocabulary cannot be refined: merge it first")
        ptr = p.data_ptr()
        if ptr in written and not torch.equal(written[ptr][1], t):
            raise AdapterError(f"{where}: {written[ptr][0]!r} and {name!r} share one tied tensor in the base but "
                               f"differ in the adapter; refine cannot untie them: merge first")
        with torch.no_grad():
            p.data.copy_(t.to(p.dtype))
        written[ptr] = (name, t)

    loras: dict[str, _Lora] = {}
    handles = []
    for name, m in modules.items():
        if m.magnitude is not None:
            raise AdapterError(f"{where}: {name} is DoRA (lora_magnitude_vector); refine trains plain LoRA factors only")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{where}: LoRA module {name!r} is not a module of the base model (names follow the "
                               f"checkpoint); is the adapter for another model?") from None
        want = nn.Embedding if m.kind == "embedding" else (nn.Linear, Conv1D)
        if not isinstance(mod, want):
            raise AdapterError(f"{where}: {name} is a {type(mod).__name__}, but the adapter holds a {m.kind} LoRA for it")
        lo = _Lora(m, device)
        if m.kind == "embedding":
            lo.padding_idx = mod.padding_idx
            if tuple(lo.A.shape[1:]) != (mod.num_embeddings,) or lo.B.shape[0] != mod.embedding_dim:
                raise AdapterError(f"{where}: {name}: A {tuple(lo.A.shape)} / B {tuple(lo.B.shape)} do not fit the "
                                   f"embedding ({mod.num_embeddings}, {mod.embedding_dim})")
        else:
            w = mod.weight
            out_f, in_f = (w.shape[1], w.shape[0]) if isinstance(mod, Conv1D) else tuple(w.shape)
            if lo.A.shape[1] != in_f or lo.B.shape[0] != out_f:
                raise AdapterError(f"{where}: {name}: A {tuple(lo.A.shape)} / B {tuple(lo.B.shape)} do not fit the "
                                   f"layer (out={out_f}, in={in_f})")
        loras[name] = lo

        def hook(_mod, args, out, lo=lo):
            return out + lo.delta(args[0]) if lo.enabled else out

        handles.append(mod.register_forward_hook(hook))

    # An output head tied to a LoRA'd input embedding must see the same delta (the merged model has it).
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None and isinstance(head, nn.Linear):
        for name, lo in loras.items():
            if lo.kind == "embedding" and model.get_submodule(name).weight is head.weight:
                def head_hook(_mod, args, out, lo=lo):
                    return out + lo.head_delta(args[0]) if lo.enabled else out

                handles.append(head.register_forward_hook(head_hook))
    return _Student(model, loras, handles)


def load_student(base: str | Path, adapter: str | Path, device: str = "cpu") -> nn.Module:
    """BASE (fp32, eval) with ADAPTER applied by our own LoRA forward (no PEFT); for checks."""
    dev = _device(device)
    _, modules, full = read_adapter(adapter)
    model = _load_model(Path(base), dev)
    _attach(model, modules, full, str(adapter), dev)
    return model


# ----------------------------------------------------------------------------- helpers


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise OptionError(f"unsupported device {device!r}; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available; use --device cpu")
    return dev


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
    return (lambda d, i, t, post=None: progress(d, i, t, post)) if four else (lambda d, i, t, post=None: progress(d, i, t))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up to lr, then cosine decay to 0 at `steps` (step counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def _check_options(steps, lr, batch, max_length, objective, holdout, eval_every, threads) -> None:
    def bad(cond, msg):
        if cond:
            raise OptionError(msg)

    def not_int(v) -> bool:
        return isinstance(v, bool) or not isinstance(v, int)

    bad(not_int(steps) or steps < 0, f"--refine-steps must be an integer >= 0, got {steps!r}")
    bad(isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0,
        f"--refine-lr must be a finite number >= 0, got {lr!r}")
    bad(not_int(batch) or batch < 1, f"--refine-batch must be an integer >= 1, got {batch!r}")
    bad(isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2,
        f"--max-length must be an integer >= 2, got {max_length!r}")
    bad(objective not in OBJECTIVES, f"--objective must be one of {OBJECTIVES}, got {objective!r}")
    bad(isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0.0 < holdout < 1.0,
        f"--holdout must be in (0, 1), got {holdout!r}")
    bad(eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1),
        f"--eval-every must be an integer >= 1, got {eval_every!r}")
    bad(threads is not None and (not isinstance(threads, int) or threads < 1), f"--threads must be >= 1, got {threads!r}")


# ----------------------------------------------------------------------------- refine


def refine_adapter(
    base: str | Path,
    adapter: str | Path,
    teacher: str | Path,
    calibration: str | Path | Sequence[str],
    out: str | Path,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    batch: int = 16,
    max_length: int = 128,
    objective: str = "auto",
    holdout: float = 0.1,
    eval_every: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> RefineResult:
    """Train ADAPTER's LoRA factors so that BASE + adapter reproduces TEACHER on calibration text.

    calibration: a file (one sample per line, or JSONL with "text") or a list of strings.
    Writes a PEFT LoRA adapter with the same modules, ranks and scales to OUT (atomically),
    holding the factors of the best held-out checkpoint (step 0 = the adapter as given).
    """
    t0 = time.perf_counter()
    _check_options(steps, lr, batch, max_length, objective, holdout, eval_every, threads)
    base, adapter, teacher, out = Path(base), Path(adapter), Path(teacher), Path(out)
    dev = _device(device)
    check_output_path(out, overwrite, [base, adapter, teacher])
    cfg, modules, full = read_adapter(adapter)
    if cfg.use_dora:
        raise AdapterError(f"{adapter}: DoRA adapter; refine trains plain LoRA factors only")
    _, arch = _model_class(base)
    _, t_arch = _model_class(teacher)
    if t_arch != arch:
        raise CheckpointError(f"teacher {teacher} is {t_arch} but base {base} is {arch}; they must share an architecture")
    obj = _resolve_objective(objective, arch, base)
    if isinstance(calibration, (str, Path)):
        texts, where = read_calibration(calibration), str(calibration)
    else:
        texts, where = [str(t) for t in calibration if str(t).strip()], "(list)"
        if not texts:
            raise OptionError("calibration list is empty; give text samples")
    train_idx, hold_idx = _split(len(texts), holdout, seed, where)
    tok = _tokenizer(base)
    ids = _tokenize(tok, texts, max_length)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    every = eval_every or max(1, steps // 10)
    emit = _progress_fn(progress)
    result_opts = {"steps": steps, "lr": lr, "batch": batch, "max_length": max_length, "objective": obj,
                   "holdout": holdout, "eval_every": every, "device": str(dev), "seed": seed,
                   "threads": threads or torch.get_num_threads(), "calibration": where}

    with _threads(threads), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        # 1. the teacher's outputs, once; then the teacher goes
        teacher_model = _load_model(teacher, dev)
        cache: list[torch.Tensor | None] = [None] * len(ids)
        order = hold_idx + train_idx
        cache_bytes = 0
        with torch.no_grad():
            for k in range(0, len(order), batch):
                chunk = order[k: k + batch]
                x, m = _collate([ids[i] for i in chunk], pad_id, dev)
                for i, t in zip(chunk, _target(_forward(teacher_model, x, m, obj), m, obj)):
                    cache[i] = t
                    cache_bytes += t.numel() * t.element_size()
                if cache_bytes > _CACHE_LIMIT:
                    raise OptionError(
                        f"cached teacher outputs exceed {_CACHE_LIMIT / 2**30:.0f} GiB after {k + len(chunk)} samples "
                        f"({obj}); use fewer calibration samples or a smaller --max-length"
                    )
                emit("teacher", min(k + batch, len(order)), len(order))
        del teacher_model

        # 2. the student: base + full tensors + LoRA hooks
        model = _load_model(base, dev)
        student = _attach(model, modules, full, str(adapter), dev)
        params = student.params()

        timer = {"eval": 0.0}

        def evaluate(step: int) -> EvalPoint:
            te = time.perf_counter()
            tot = cos = 0.0
            n = 0
            mx = 0.0
            with torch.no_grad():
                for k in range(0, len(hold_idx), batch):
                    chunk = hold_idx[k: k + batch]
                    x, m = _collate([ids[i] for i in chunk], pad_id, dev)
                    _, (s, c, u, d) = _loss(_forward(model, x, m, obj), m, [cache[i] for i in chunk], obj)
                    tot, cos, n, mx = tot + s, cos + c, n + u, max(mx, d)
            kl = obj == "logits-kl"
            timer["eval"] += time.perf_counter() - te
            return EvalPoint(step, tot / n, None if kl else cos / n, tot / n if kl else None, mx)

        with student.disabled():
            no_adapter = evaluate(0)
        before = evaluate(0)
        curve = [before]
        best, best_state = before, [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        warmup = max(1, min(100, steps // 10))
        gen = torch.Generator().manual_seed(seed)
        stream: list[int] = []
        run_loss, run_n, train_loss = 0.0, 0, []
        t_train, timer["eval"] = time.perf_counter(), 0.0
        emit("refine", 0, steps, f"held-out {before.loss:.4g}")
        for step in range(steps):
            if len(stream) < min(batch, len(train_idx)):
                stream += [train_idx[i] for i in torch.randperm(len(train_idx), generator=gen).tolist()]
            chunk, stream = stream[:batch], stream[batch:]
            x, m = _collate([ids[i] for i in chunk], pad_id, dev)
            loss, _ = _loss(_forward(model, x, m, obj), m, [cache[i] for i in chunk], obj)
            if not torch.isfinite(loss.detach()):
                raise SurgeryError(f"refine loss became {float(loss.detach())} at step {step + 1}; lower --refine-lr "
                                   f"(now {lr:g}); nothing was written")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, lr, warmup)
            opt.step()
            run_loss, run_n = run_loss + float(loss.detach()), run_n + 1
            done = step + 1
            if done % every == 0 or done == steps:
                point = evaluate(done)
                curve.append(point)
                train_loss.append((done, run_loss / run_n))
                run_loss, run_n = 0.0, 0
                if point.loss < best.loss:  # ties keep the earlier checkpoint (lr 0 keeps the input)
                    best, best_state = point, [p.detach().clone() for p in params]
            emit("refine", done, steps, f"loss {float(loss.detach()):.4g} held-out {curve[-1].loss:.4g}")
        train_seconds, eval_seconds = time.perf_counter() - t_train, timer["eval"]
        student.remove()
        del model

    # 3. the adapter: same modules, ranks, scales, full tensors and config fields; best factors
    it = iter(best_state)
    refined: dict[str, LoraModule] = {}
    for name, m in modules.items():
        a, b = next(it), next(it)
        refined[name] = LoraModule(name, m.kind, a.cpu().to(m.A.dtype).contiguous(), b.cpu().to(m.B.dtype).contiguous(),
                                   m.bias, None, m.scaling)
    extra = {k: v for k, v in cfg.raw.items() if k not in _CONFIG_COMPUTED}
    fifo = bool(cfg.fan_in_fan_out)
    write_adapter(out, refined, full_tensors=full, base_model_name_or_path=cfg.base_model_name_or_path,
                  task_type=cfg.task_type, fan_in_fan_out=fifo, extra_config=extra, overwrite=overwrite,
                  inputs=[base, adapter, teacher])
    return RefineResult(
        out=out, objective=obj, steps=steps, best_step=best.step, train_samples=len(train_idx),
        holdout_samples=len(hold_idx), trainable_params=sum(p.numel() for p in params), no_adapter=no_adapter,
        before=before, after=best, curve=curve, train_loss=train_loss, cache_bytes=cache_bytes,
        seconds=time.perf_counter() - t0, train_seconds=train_seconds, eval_seconds=eval_seconds,
        options=result_opts,
    )


def extract_and_refine(
    base: str | Path,
    ft: str | Path,
    out: str | Path,
    *,
    calibration: str | Path | Sequence[str],
    refine_steps: int = 300,
    refine_lr: float = 1e-3,
    refine_batch: int = 16,
    max_length: int = 128,
    objective: str = "auto",
    holdout: float = 0.1,
    eval_every: int | None = None,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    **extract_options,
):
    """extract_lora(BASE, FT) into a temporary directory, then refine_adapter with FT as the
    teacher into OUT. Returns (ExtractResult, RefineResult); OUT appears only when both succeed.
    extract_options are extract_lora's keyword options (rank, energy, budget, embeddings, ...)."""
    from surgery.ops.extract import extract_lora

    _check_options(refine_steps, refine_lr, refine_batch, max_length, objective, holdout, eval_every, threads)
    base, ft, out = Path(base), Path(ft), Path(out)
    check_output_path(out, overwrite, [base, ft])
    # cheap checks first, so a bad calibration file fails before the SVDs
    if isinstance(calibration, (str, Path)):
        _split(len(read_calibration(calibration)), holdout, seed, str(calibration))
    _resolve_objective(objective, _model_class(base)[1], base)
    _tokenizer(base)
    _device(device)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.extract-", dir=out.parent))
    except OSError as e:
        raise SurgeryError(f"cannot create a temporary directory beside {out} ({e.strerror or e})") from None
    try:
        ex = extract_lora(base, ft, tmp / "adapter", device=device, seed=seed, progress=progress, **extract_options)
        res = refine_adapter(base, tmp / "adapter", ft, calibration, out, steps=refine_steps, lr=refine_lr,
                             batch=refine_batch, max_length=max_length, objective=objective, holdout=holdout,
                             eval_every=eval_every, device=device, seed=seed, threads=threads,
                             overwrite=overwrite, progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ex.out = out
    return ex, res


__all__ = ["EvalPoint", "RefineResult", "read_calibration", "refine_adapter", "extract_and_refine",
           "load_student", "OBJECTIVES"]
