"""The main job end to end: extract -> merge -> export -> validate, with a short report.

`run_pipeline` is what `surgery demo` runs on the fixture pair; it works on any
base/fine-tune pair of a supported architecture.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from surgery.onnx.export import export_onnx
from surgery.ops.extract import extract_lora
from surgery.io import LazyReader, open_checkpoint
from surgery.ops.merge import merge

Progress = Callable[[str, int, int], None]


def weight_agreement(merged: Path, ft: Path, base: Path, names: list[str]) -> dict:
    """How closely the merged weights reproduce the fine-tune, streamed:
    ‖merged − ft‖_F / ‖ft − base‖_F over `names` (the tensors the adapter changed)."""
    err = tot = 0.0
    worst = 0.0
    with LazyReader(open_checkpoint(merged)) as rm, LazyReader(open_checkpoint(ft)) as rf, \
            LazyReader(open_checkpoint(base)) as rb:
        for name in rb.order(names):
            wf = rf.get(name).float()
            e = rm.get(name).float() - wf
            err += float(e.double().pow(2).sum())
            tot += float((wf - rb.get(name).float()).double().pow(2).sum())
            worst = max(worst, float(e.abs().max()))
    return {"rel_error": math.sqrt(err / tot) if tot else 0.0, "max_abs_diff": worst, "tensors": len(names)}


def output_agreement(merged: Path, ft: Path, base: Path, seed: int = 0) -> dict:
    """Last hidden state / logits of merged vs fine-tune (and base vs fine-tune as the control)."""
    from surgery.onnx.export import load_hf_model

    outs = {}
    g = torch.Generator().manual_seed(seed)
    ids = None
    for tag, path in (("merged", merged), ("ft", ft), ("base", base)):
        model, config, _ = load_hf_model(path)
        if ids is None:
            vocab = int(getattr(config, "vocab_size", 100) or 100)
            ids = torch.randint(0, vocab, (2, 11), generator=g)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        outs[tag] = (out.logits if hasattr(out, "logits") and out.logits is not None else out[0]).float()
    ref = outs["ft"]
    return {
        "merged_vs_ft_max_abs": float((outs["merged"] - ref).abs().max()),
        "base_vs_ft_max_abs": float((outs["base"] - ref).abs().max()),
        "merged_vs_ft_cosine": float(torch.nn.functional.cosine_similarity(
            outs["merged"].flatten(), ref.flatten(), dim=0)),
    }


def run_pipeline(base: str | Path, ft: str | Path, workdir: str | Path, *, rank: int = 4,
                 optimize: bool = False, progress: Progress | None = None) -> dict:
    """extract-lora -> merge -> export-onnx (validated); everything lands under workdir."""
    base, ft, workdir = Path(base), Path(ft), Path(workdir)
    t0 = time.perf_counter()
    lora, merged, onnx_dir = workdir / "lora", workdir / "merged", workdir / "onnx"
    # bias="lora" (the default before bias="auto"): embeddings saved whole, so the demo's merged
    # model matches the fine-tune to the LoRA modules' reported error
    ex = extract_lora(base, ft, lora, rank=rank, bias="lora", overwrite=True, progress=progress)
    t1 = time.perf_counter()
    mg = merge(base, [lora], merged, overwrite=True, progress=progress)
    t2 = time.perf_counter()
    changed = [n for n in mg.changed if n in open_checkpoint(base).tensors]
    weights = weight_agreement(merged, ft, base, [
        f"{m.module}.weight" for m in ex.modules if f"{m.module}.weight" in changed])
    outputs = output_agreement(merged, ft, base)
    t3 = time.perf_counter()
    exp = export_onnx(merged, onnx_dir, optimize=optimize, overwrite=True, progress=progress)
    t4 = time.perf_counter()
    return {
        "base": str(base), "ft": str(ft), "workdir": str(workdir), "rank": rank,
        "extract": {"out": str(lora), "modules": len(ex.modules), "adapter_params": ex.adapter_params,
                    "full_params": ex.full_params, "overall_rel_error": ex.overall_rel_error,
                    "seconds": t1 - t0, "worst_module": max(ex.modules, key=lambda m: m.rel_error).module},
        "merge": {"out": str(merged), "changed": len(mg.changed), "seconds": t2 - t1,
                  "weights_vs_ft": weights, "outputs_vs_ft": outputs},
        "export": {"out": str(onnx_dir), "status": exp.status, "exporter": exp.exporter,
                   "provider": exp.provider, "provider_note": exp.provider_note, "seconds": t4 - t3,
                   "validation": [r.__dict__ for r in exp.validation]},
        "seconds": time.perf_counter() - t0,
    }
