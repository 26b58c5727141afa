"""A hard refine benchmark: a causal LM fully fine-tuned on a second domain (a high-rank delta).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_refine_hard.py [--arch llama|gpt2] [--device cpu|cuda]

Deterministic (fixed seeds, one thread): builds everything under --work, then prints a table.
1. base: LlamaForCausalLM, or GPT2LMHeadModel with --arch gpt2 (Conv1D layers) (hidden 128, 2 layers, 4 heads, vocab 128 = 4 specials + the fixture
   word list) trained from scratch on domain A: template sentences ("the red cat see a dog .")
   mixed with pairs "w g(w) , ..." under a fixed random bijection g of 117 words.
2. ft: the base FULLY fine-tuned on domain B: the same pairs under another bijection f (re-mapping
   117 words needs a high-rank delta; the format and vocabulary are already known).
3. per rank R in --ranks: extract_lora(base, ft, rank=R) (SVD), then refine_adapter(..., objective
   logits-kl) on domain-B calibration text (disjoint from the held-out items).
gain kept = (loss_base − loss_adapter) / (loss_base − loss_ft), mean next-token CE on held-out
domain-B items. Paired test refined vs SVD on the per-item losses: sign test (exact, two-sided)
and paired t. Bench scaffolding: it prints, and is not library code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fixtures.make_fixtures import WORDS, make_wordlevel_tokenizer  # noqa: E402

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
DETS, ADJS = ["the", "a", "this", "that"], ["red", "green", "blue", "black", "white", "small", "large", "old", "new"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "house", "car", "road", "city", "sun", "moon", "model"]
VERBS = ["see", "make", "take", "walk", "run", "say"]
PAIR_WORDS = [w for w in WORDS if w.isalpha()]  # 117 words


def domain_a(rng: random.Random) -> str:
    """Template sentences: det (adj) noun verb det (adj) noun [and ...] ."""
    def np_() -> str:
        return " ".join([rng.choice(DETS)] + ([rng.choice(ADJS)] if rng.random() < 0.5 else []) + [rng.choice(NOUNS)])
    s = f"{np_()} {rng.choice(VERBS)} {np_()}"
    if rng.random() < 0.4:
        s += f" and {np_()} {rng.choice(VERBS)} {np_()}"
    return s + " ."


def domain_b(rng: random.Random, f: dict[str, str]) -> str:
    """Pairs under the fixed bijection F: 'w1 f(w1) , w2 f(w2) , ...'."""
    return " , ".join(f"{w} {f[w]}" for w in rng.sample(PAIR_WORDS, rng.randint(4, 8))) + " ."


def encode(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def item_losses(model, tok, texts: list[str], device, bs: int = 50) -> torch.Tensor:
    """Mean next-token CE per text (non-padding targets), shape (n,)."""
    out = []
    with torch.no_grad():
        for k in range(0, len(texts), bs):
            ids, m = (t.to(device) for t in encode(tok, texts[k: k + bs]))
            logits = model(input_ids=ids, attention_mask=m).logits.float()[:, :-1]
            ce = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (b, L-1)
            w = m[:, 1:].float()
            out.append(((ce * w).sum(1) / w.sum(1)).cpu())
    return torch.cat(out)


def train_lm(model, tok, texts: list[str], steps: int, lr: float, seed: int, device, bs: int = 32) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(texts), (bs,), generator=gen).tolist()
        ids, m = (t.to(device) for t in encode(tok, [texts[i] for i in idx]))
        labels = ids.masked_fill(m == 0, -100)
        loss = model(input_ids=ids, attention_mask=m, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        opt.step()
    model.eval()


def new_model(arch: str) -> torch.nn.Module:
    """A randomly initialised causal LM: Llama-style (Linear layers) or GPT-2 (Conv1D layers), same size."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=128, n_inner=256, n_layer=2, n_head=4,
                                          n_positions=64, tie_word_embeddings=False, **ids))
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                        tie_word_embeddings=False, **ids))


def build(work: Path, a: argparse.Namespace, device) -> tuple[list[str], list[str]]:
    """base/ and ft/ under WORK (reused when present); returns (calibration texts, held-out texts)."""
    rng = random.Random(0)
    f = dict(zip(PAIR_WORDS, rng.sample(PAIR_WORDS, len(PAIR_WORDS)), strict=True))
    g = dict(zip(PAIR_WORDS, rng.sample(PAIR_WORDS, len(PAIR_WORDS)), strict=True))
    texts_a = [domain_a(rng) if i % 2 else domain_b(rng, g) for i in range(6000)]
    texts_b = [domain_b(rng, f) for _ in range(3000 + a.calibration + a.holdout)]
    ft_train, calib, held = texts_b[:3000], texts_b[3000: 3000 + a.calibration], texts_b[3000 + a.calibration:]
    tok = make_wordlevel_tokenizer(SPECIALS, WORDS, prepend_bos=True)
    tok.model_max_length = 64
    if not (work / "ft" / "config.json").exists():
        torch.manual_seed(0)
        model = new_model(a.arch).to(device)
        t0 = time.perf_counter()
        train_lm(model, tok, texts_a, a.base_steps, 3e-3, 1, device)
        model.save_pretrained(work / "base")
        tok.save_pretrained(work / "base")
        train_lm(model, tok, ft_train, a.ft_steps, a.ft_lr, 2, device)
        model.save_pretrained(work / "ft")
        tok.save_pretrained(work / "ft")
        print(f"built base + ft in {time.perf_counter() - t0:.0f} s", flush=True)
    return calib, held


def paired(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, float, float]:
    """(items where x < y, items where x > y, exact two-sided sign-test p, paired t) for x − y."""
    d = (x - y).double()
    lo, hi = int((d < 0).sum()), int((d > 0).sum())
    n, k = lo + hi, min(lo, hi)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    t = float(d.mean() / (d.std(unbiased=True) / math.sqrt(len(d)))) if len(d) > 1 and d.std() > 0 else 0.0
    return lo, hi, p, t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="default bench/work/hard[-gpt2]")
    ap.add_argument("--arch", choices=("llama", "gpt2"), default="llama")
    ap.add_argument("--ranks", default="1,4,8,16")
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--ft-steps", type=int, default=1000)
    ap.add_argument("--ft-lr", type=float, default=3e-3)
    ap.add_argument("--calibration", type=int, default=800)
    ap.add_argument("--holdout", type=int, default=300)
    ap.add_argument("--steps", type=int, default=None, help="refine steps (None = refine's default)")
    ap.add_argument("--lr", type=float, default=None, help="refine lr (None = refine's default)")
    ap.add_argument("--batch", type=int, default=None, help="refine batch size (None = refine's default)")
    ap.add_argument("--objective", default="auto")
    ap.add_argument("--patience", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", action="store_true",
                    help="start from extract's --budget rR (the allocator; a row-sparse embedding delta as rows) "
                         "instead of a uniform rank R")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    a.work = a.work or Path("bench/work/hard" + ("-gpt2" if a.arch == "gpt2" else ""))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from surgery.ops.extract import extract_lora
    from surgery.ops.refine import _load_model, load_student, refine_adapter

    device = torch.device(a.device)
    a.work.mkdir(parents=True, exist_ok=True)
    calib, held = build(a.work, a, device)
    tok = make_wordlevel_tokenizer(SPECIALS, WORDS, prepend_bos=True)
    l_base = item_losses(_load_model(a.work / "base", device), tok, held, device)
    l_ft = item_losses(_load_model(a.work / "ft", device), tok, held, device)
    gap = float(l_base.mean() - l_ft.mean())
    print(f"held-out CE: base {l_base.mean():.4f}  ft {l_ft.mean():.4f}  (gain {gap:.4f}, {len(held)} items)")
    rows = []
    for r in [int(x) for x in a.ranks.split(",")]:
        tag = "bud" if a.budget else "svd"
        svd, ref = a.work / f"{tag}{r}", a.work / (f"ref{r}" + ("-bud" if a.budget else ""))
        policy = {"budget": f"r{r}"} if a.budget else {"rank": r}
        extract_lora(a.work / "base", a.work / "ft", svd, overwrite=True, **policy)
        given = {k: v for k, v in (("steps", a.steps), ("lr", a.lr), ("batch_size", a.batch)) if v is not None}
        res = refine_adapter(a.work / "base", svd, ref, teacher=a.work / "ft", calibration=calib, max_length=64,
                             objective=a.objective, patience=a.patience, threads=torch.get_num_threads(),
                             device=a.device, overwrite=True, **given)
        l_svd = item_losses(load_student(a.work / "base", svd, a.device), tok, held, device)
        l_ref = item_losses(load_student(a.work / "base", ref, a.device), tok, held, device)
        k_svd, k_ref = (float(l_base.mean() - x.mean()) / gap for x in (l_svd, l_ref))
        better, worse, p, t = paired(l_ref, l_svd)
        row = {"rank": r, "start": svd.name, "svd_kept": k_svd, "refined_kept": k_ref, "ref_better": better, "ref_worse": worse,
               "sign_p": p, "paired_t": t, "refine_s": res.seconds, "steps_run": res.steps_run,
               "steps_per_s": res.steps_per_second, "best_step": res.best_step, "device": res.device}
        rows.append(row)
        print(f"r{r:<3} SVD {100 * k_svd:6.1f} %  refined {100 * k_ref:6.1f} %  better/worse {better}/{worse} "
              f"sign p {p:.1e} t {t:.1f}  refine {res.seconds:.0f} s ({res.steps_per_second:.1f} steps/s, "
              f"best step {res.best_step}/{res.steps_run}, {res.device})", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"base": float(l_base.mean()), "ft": float(l_ft.mean()), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
