"""extract-lora --refine on a real full fine-tune of all-MiniLM-L6-v2: task gain kept, and speed.

    .venv/bin/python fixtures/make_sts_twin.py --out bench/work/sts --threads 1      # the twin (≈5 min)
    .venv/bin/python bench/bench_refine.py --work bench/work/sts [--rank 8] [--steps 300] [--lr 1e-3]
        [--threads 1] [--ref-ranks 32] [--extract bias=skip] [--timing]

Task gain kept = (Spearman(adapter) − Spearman(base)) / (Spearman(ft) − Spearman(base)) on the
twin's held-out test pairs (phrases never in the fine-tuning data nor the calibration text).
Adapters are run with surgery.ops.refine.load_student (our LoRA forward; PEFT-equal in the tests).
--timing: seconds per 100 refine steps at batch 16, length 64 (calibration lines of ≥ 64
tokens), 1 vs 2 threads, held-out scoring excluded. Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fixtures.make_sts_twin import evaluate  # noqa: E402
from surgery.ops.extract import extract_lora  # noqa: E402
from surgery.ops.refine import load_student, refine_adapter  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def emit(obj: dict) -> None:
    print(json.dumps({**obj, "uptime": uptime()}), flush=True)


def parse_kv(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        out[k.replace("-", "_")] = v
    return out


def main() -> None:
    import shutil

    try:
        run()
    finally:
        for d in Path(ARGS_WORK[0]).glob("bench-refine-*"):
            shutil.rmtree(d, ignore_errors=True)


ARGS_WORK = ["bench/work/sts"]


def run() -> None:
    from transformers import AutoTokenizer, BertModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="bench/work/sts")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--ref-ranks", type=int, nargs="*", default=[32], help="SVD-only ranks for reference")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extract", nargs="*", default=[], help="extract_lora options, e.g. bias=skip embeddings=skip")
    ap.add_argument("--timing", action="store_true", help="only the speed measurement (1 vs 2 threads)")
    ap.add_argument("--timing-steps", type=int, default=30)
    a = ap.parse_args()
    work = Path(a.work)
    ARGS_WORK[0] = str(work)
    base, ft = work / "base", work / "ft"
    tmp = Path(tempfile.mkdtemp(prefix="bench-refine-", dir=work))
    ex_opts = parse_kv(a.extract)

    if a.timing:
        # lines of ≥ 64 tokens: six calibration sentences each
        sents = (work / "calibration.txt").read_text().split("\n")
        long = [" ".join(sents[i: i + 6]) for i in range(0, 6 * 200, 6)]
        svd = tmp / "svd"
        extract_lora(base, ft, svd, rank=a.rank, **ex_opts)
        for threads in (1, 2):
            res = refine_adapter(base, svd, tmp / f"t{threads}", teacher=ft, calibration=long, steps=a.timing_steps,
                                 lr=a.lr, batch_size=16, max_length=64, eval_every=a.timing_steps, threads=threads,
                                 seed=a.seed, device="cpu")
            emit({"what": "timing", "threads": threads, "steps": a.timing_steps, "batch": 16, "max_length": 64,
                  "seconds_per_100_steps": round(res.seconds_per_100_steps, 1),
                  "train_seconds": round(res.train_seconds, 1), "eval_seconds": round(res.eval_seconds, 1)})
        return

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    test = [json.loads(ln) for ln in (work / "test_pairs.jsonl").read_text().splitlines()]

    def score(model) -> float:
        with torch.no_grad():
            return evaluate(model, tok, test)

    t = time.perf_counter()
    s_base = score(BertModel.from_pretrained(str(base), dtype=torch.float32).eval())
    s_ft = score(BertModel.from_pretrained(str(ft), dtype=torch.float32).eval())
    gain = s_ft - s_base
    emit({"what": "models", "base_spearman": round(s_base, 4), "ft_spearman": round(s_ft, 4),
          "test_pairs": len(test), "seconds": round(time.perf_counter() - t, 1)})

    def kept(s: float) -> float:
        return (s - s_base) / gain

    for r in [a.rank, *a.ref_ranks]:
        ex = extract_lora(base, ft, tmp / f"svd{r}", rank=r, **ex_opts)
        s = score(load_student(base, tmp / f"svd{r}"))
        emit({"what": "svd", "rank": r, "extract": ex_opts, "spearman": round(s, 4), "gain_kept": round(kept(s), 4),
              "lora_params": ex.adapter_params, "full_params": ex.full_params, "full": len(ex.full),
              "weight_rel_error": round(ex.overall_rel_error, 4)})

    t = time.perf_counter()
    res = refine_adapter(base, tmp / f"svd{a.rank}", tmp / "refined", teacher=ft, calibration=work / "calibration.txt",
                         steps=a.steps, lr=a.lr, batch_size=a.batch, max_length=a.max_length, threads=a.threads,
                         seed=a.seed, device="cpu")
    wall = time.perf_counter() - t
    s = score(load_student(base, tmp / "refined"))
    emit({"what": "refine", "rank": a.rank, "extract": ex_opts, "steps": a.steps, "lr": a.lr, "batch": a.batch,
          "max_length": a.max_length, "threads": a.threads, "spearman": round(s, 4), "gain_kept": round(kept(s), 4),
          "best_step": res.best_step, "heldout_loss_no_adapter": res.no_adapter.loss,
          "heldout_loss_svd": res.before.loss, "heldout_loss_refined": res.after.loss,
          "heldout_cos_svd": res.before.cosine, "heldout_cos_refined": res.after.cosine,
          "curve": [(p.step, round(p.loss, 6)) for p in res.curve],
          "seconds": round(wall, 1), "seconds_per_100_steps": round(res.seconds_per_100_steps, 1)})


if __name__ == "__main__":
    main()
