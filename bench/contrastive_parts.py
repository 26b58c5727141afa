"""Which parts of the §11 fine-tune's delta carry its held-out retrieval gain (merged models, no LoRA).

    OMP_NUM_THREADS=1 .venv/bin/python bench/contrastive_parts.py --work bench/work/c2

Reuses the models bench_refine_contrastive.py built (--query-cipher 300). Each row is the base with
some tensors' deltas applied whole ("full"), left out ("base") or cut to an exact truncated SVD of
rank R, then scored like the benchmark: MRR / R@1 kept, top-1 agreement with the fine-tune, 1 − cos.
Bench scaffolding: it prints, and is not library code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_refine_contrastive import Run, kept, metrics, split_pairs  # noqa: E402


def trunc(d: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(d.double(), full_matrices=False)
    return ((U[:, :r] * S[:r]) @ Vh[:r]).to(d.dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("bench/work/c2"))
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModel, AutoTokenizer

    _, held = split_pairs(argparse.Namespace(min_passage=80, holdout=500, query_cipher=300))
    tok = AutoTokenizer.from_pretrained(a.work / "base")
    base, ft = (AutoModel.from_pretrained(a.work / n).eval() for n in ("base", "ft"))
    sb, sf = base.state_dict(), ft.state_dict()
    run_ft = Run(ft, tok, held, 32)
    m_base, m_ft = metrics(Run(base, tok, held, 32).ranks), metrics(run_ft.ranks)

    def emb(k: str) -> bool:
        return "embeddings" in k

    def ffn(k: str) -> bool:
        return "intermediate" in k or ("output.dense" in k and "attention" not in k)

    rules = {
        "SVD r8 everywhere": lambda k, w: 8,
        "SVD r16 everywhere": lambda k, w: 16,
        "SVD r32 everywhere": lambda k, w: 32,
        "ft, word embeddings = base": lambda k, w: "base" if "word_embeddings" in k else "full",
        "ft, all embeddings = base": lambda k, w: "base" if emb(k) else "full",
        "base + word-embedding delta only": lambda k, w: "full" if "word_embeddings" in k else "base",
        "SVD r8 linears, word embeddings full": lambda k, w: "full" if "word_embeddings" in k else 8,
        "SVD r8 linears, embeddings = base": lambda k, w: "base" if emb(k) else 8,
        "ft, attention matrices = base": lambda k, w: "base" if "attention" in k and w.ndim == 2 else "full",
        "ft, FFN matrices = base": lambda k, w: "base" if ffn(k) and w.ndim == 2 else "full",
    }
    for name, rule in rules.items():
        sd = {}
        for k, w in sb.items():
            d, how = sf[k] - w, rule(k, w)
            sd[k] = w + (d if how == "full" or w.ndim != 2 and how != "base" else 0 * d if how == "base"
                         else trunc(d, how))
        model = AutoModel.from_pretrained(a.work / "base").eval()
        model.load_state_dict(sd)
        run = Run(model, tok, held, 32)
        k, f = kept(metrics(run.ranks), m_base, m_ft), run.fidelity(run_ft)
        print(f"{name:40s} MRR kept {100 * k['mrr']:6.1f} %  R@1 kept {100 * k['r@1']:6.1f} %  "
              f"top-1 = ft {100 * f['top1_agree']:.1f} %  1-cos {f['one_minus_cos']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
