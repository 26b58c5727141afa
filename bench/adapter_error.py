"""Per-module error of a PEFT LoRA adapter against the true fine-tune delta.

    python bench/adapter_error.py ADAPTER_DIR BASE FT [--json OUT.json] [--optimal] [--quiet]

For every tensor of BASE/FT, Δ = FT − BASE (fp32), and Δ̂ is what the adapter makes
PEFT apply to that tensor:
  lora_A/lora_B          Δ̂ = s · B @ A  (transposed with fan_in_fan_out), s = alpha/r (alpha/√r rsLoRA),
                         r and alpha from rank_pattern / alpha_pattern as PEFT resolves them
  lora_embedding_A/B     Δ̂ = (s · B @ A)ᵀ
  lora_B.bias            Δ̂ = s · b  only when lora_bias is true (PEFT drops it otherwise)
  full tensors           (modules_to_save) Δ̂ = saved − BASE
  nothing in the adapter Δ̂ = 0
and the report is ‖Δ − Δ̂‖_F / ‖Δ‖_F per tensor, plus the energy-weighted totals
sqrt(Σ‖Δ − Δ̂‖² / Σ‖Δ‖²) over the LoRA tensors and over all tensors.
--optimal also gives the Eckart–Young optimum at the same rank: sqrt(‖Δ‖² − Σ_{i≤r} σ_i²)/‖Δ‖
(svdvals in fp64 of each LoRA delta; slow on big models).

Tensors are read one at a time (safe_open), so memory is a few tensors. This is an
independent oracle: it does not import surgery.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open


class Tensors:
    """Name -> file map over a safetensors file or an HF directory (single or sharded)."""

    def __init__(self, path: str | Path):
        p = Path(path)
        if p.is_file():
            files = [p]
        elif (p / "model.safetensors.index.json").exists():
            wm = json.loads((p / "model.safetensors.index.json").read_text())["weight_map"]
            files = sorted({p / f for f in wm.values()})
        elif (p / "model.safetensors").exists():
            files = [p / "model.safetensors"]
        elif (p / "adapter_model.safetensors").exists():
            files = [p / "adapter_model.safetensors"]
        else:
            raise SystemExit(f"no safetensors checkpoint at {p}")
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    self.where[k] = f
        self._open: tuple[Path, object] | None = None

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        if self._open is None or self._open[0] != f:
            self._open = (f, safe_open(str(f), "pt"))
        return self._open[1].get_tensor(name)

    def names(self) -> list[str]:
        return list(self.where)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: a key matches when the module name ends with it (regex)."""
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


def resolve(adapter_key_module: str, base_names: set[str]) -> str | None:
    """The base tensor prefix an adapter module path refers to (tolerates a model-class prefix)."""
    cands = [adapter_key_module]
    parts = adapter_key_module.split(".")
    cands += [".".join(parts[i:]) for i in range(1, len(parts))]
    for c in cands:
        if c + ".weight" in base_names or c + ".bias" in base_names:
            return c
    for pre in ("model.", "bert.", "transformer."):
        c = pre + adapter_key_module
        if c + ".weight" in base_names:
            return c
    return None


def analyse(adapter_dir: Path, base_path: str, ft_path: str, optimal: bool = False):
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    ad = Tensors(adapter_dir / "adapter_model.safetensors")
    base, ft = Tensors(base_path), Tensors(ft_path)
    base_names = set(base.names())
    r0, a0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora, fifo = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
    lora_bias = bool(cfg.get("lora_bias"))

    # group adapter keys by the base tensor they change
    plan: dict[str, dict] = {}  # base tensor name -> {"kind", keys...}
    unmatched = []
    suffixes = {
        ".lora_A.weight": ("lora", "A"), ".lora_B.weight": ("lora", "B"),
        ".lora_embedding_A": ("emb", "A"), ".lora_embedding_B": ("emb", "B"),
        ".lora_B.bias": ("bias", "b"),
    }
    for key in ad.names():
        k = key.removeprefix("base_model.model.")
        for suf, (kind, role) in suffixes.items():
            if k.endswith(suf):
                mod_path = k[: -len(suf)]
                mod = resolve(mod_path, base_names)
                if mod is None:
                    unmatched.append(key)
                    break
                tname = mod + (".bias" if kind == "bias" else ".weight")
                e = plan.setdefault(tname, {"kind": kind, "module": mod, "peft_module": mod_path})
                e[role] = key
                break
        else:  # a full tensor (modules_to_save)
            k2 = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)
            mod_path, leaf = k2.rsplit(".", 1)
            mod = resolve(mod_path, base_names)
            if mod is None or f"{mod}.{leaf}" not in base_names:
                unmatched.append(key)
                continue
            plan[f"{mod}.{leaf}"] = {"kind": "full", "module": mod, "peft_module": mod_path, "W": key}

    rows = []
    tot = {"lora": [0.0, 0.0], "all": [0.0, 0.0], "opt": [0.0, 0.0]}
    for name in base.names():
        w0 = base.get(name)
        if not w0.is_floating_point():
            continue
        d = ft.get(name).float() - w0.float()  # (out, in) or (d,)
        e = plan.get(name)
        kind, rank, note = "missing", 0, ""
        if e is None:
            dh = torch.zeros_like(d)
        elif e["kind"] == "full":
            kind = "full"
            dh = ad.get(e["W"]).float() - w0.float()
        else:
            mod = e["peft_module"]
            r = pattern_value(rank_pat, mod, r0)
            alpha = pattern_value(alpha_pat, mod, a0)
            s = alpha / (math.sqrt(r) if rslora else r)
            if e["kind"] == "bias":
                kind = "lora_bias"
                if lora_bias:
                    dh = s * ad.get(e["b"]).float()  # (out,)
                else:
                    dh, note = torch.zeros_like(d), "lora_bias false: PEFT drops it"
            else:
                a, b = ad.get(e["A"]).float(), ad.get(e["B"]).float()
                rank = a.shape[0]
                if rank != r:
                    note = f"A has {rank} rows but PEFT uses r={r}"
                dh = s * (b @ a)  # (out, in)
                if e["kind"] == "emb" or fifo:
                    dh = dh.T
                kind = "lora" if e["kind"] == "lora" else "lora_emb"
                if dh.shape != d.shape:
                    rows.append({"tensor": name, "kind": kind, "rank": rank,
                                 "error": f"shape {tuple(dh.shape)} != {tuple(d.shape)}"})
                    continue
        dn2 = float(d.double().pow(2).sum())
        en2 = float((d - dh).double().pow(2).sum())
        row = {"tensor": name, "kind": kind, "rank": rank, "delta_norm": math.sqrt(dn2),
               "rel_err": math.sqrt(en2 / dn2) if dn2 > 0 else (0.0 if en2 == 0 else math.inf)}
        if note:
            row["note"] = note
        if optimal and kind in ("lora", "lora_emb"):
            sv = torch.linalg.svdvals(d.double())
            opt2 = max(dn2 - float(sv[:rank].pow(2).sum()), 0.0)
            row["optimal_rel_err"] = math.sqrt(opt2 / dn2) if dn2 > 0 else 0.0
            tot["opt"][0] += opt2
            tot["opt"][1] += dn2
        rows.append(row)
        tot["all"][0] += en2
        tot["all"][1] += dn2
        if kind in ("lora", "lora_emb"):
            tot["lora"][0] += en2
            tot["lora"][1] += dn2
    lora_rows = [r for r in rows if r.get("kind") in ("lora", "lora_emb") and "rel_err" in r]
    errs = sorted(r["rel_err"] for r in lora_rows)
    summary = {
        "adapter": str(adapter_dir),
        "n_tensors": len(rows),
        "n_lora": len(lora_rows),
        "n_full": sum(r["kind"] == "full" for r in rows),
        "n_missing_with_delta": sum(r["kind"] == "missing" and r.get("delta_norm", 0) > 0 for r in rows),
        "n_bias_dropped": sum("lora_bias false" in r.get("note", "") for r in rows),
        "lora_total_rel_err": math.sqrt(tot["lora"][0] / tot["lora"][1]) if tot["lora"][1] else None,
        "lora_median_rel_err": errs[len(errs) // 2] if errs else None,
        "lora_max_rel_err": errs[-1] if errs else None,
        "all_total_rel_err": math.sqrt(tot["all"][0] / tot["all"][1]) if tot["all"][1] else None,
        "unmatched_adapter_keys": unmatched,
        "task_type": cfg.get("task_type"),
    }
    if optimal and tot["opt"][1]:
        summary["lora_total_optimal_rel_err"] = math.sqrt(tot["opt"][0] / tot["opt"][1])
    return summary, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("adapter")
    p.add_argument("base")
    p.add_argument("ft")
    p.add_argument("--json", help="write {summary, rows} here")
    p.add_argument("--optimal", action="store_true", help="also the Eckart–Young optimum per module")
    p.add_argument("--quiet", action="store_true", help="summary only")
    a = p.parse_args()
    torch.set_num_threads(1)  # MKL SVD at 2 threads is erratic on this machine
    summary, rows = analyse(Path(a.adapter), a.base, a.ft, a.optimal)
    if not a.quiet:
        for r in rows:
            if "error" in r:
                print(f"{r['tensor']:<60} {r['kind']:<9} {r['error']}")
                continue
            opt = f"  opt {r['optimal_rel_err']:.4f}" if "optimal_rel_err" in r else ""
            print(f"{r['tensor']:<60} {r['kind']:<9} r={r['rank']:<3} rel_err {r['rel_err']:.4f}{opt}"
                  f"{'  (' + r['note'] + ')' if 'note' in r else ''}")
    print(json.dumps(summary, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
