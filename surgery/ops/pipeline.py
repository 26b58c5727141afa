"""The main job end to end: extract -> merge -> export -> validate, with a short report.

`run_pipeline` is what `surgery demo` runs on the fixture pair; it works on any
base/fine-tune pair of a supported architecture. Phases, each timed and reported:

  extract   extract_lora(BASE, FT) -> WORKDIR/lora
  merge     merge(BASE, lora) -> WORKDIR/merged, then checked against FT: weights (streamed)
            and outputs (with BASE as the control that must differ)
  export    export_onnx(merged) -> WORKDIR/onnx, validated on onnxruntime
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from surgery.io import LazyReader, check_output_path, open_checkpoint
from surgery.onnx.export import ExportResult, export_onnx
from surgery.onnx.model import load_hf_model
from surgery.ops.extract import extract_lora
from surgery.ops.merge import merge
from surgery.options.demo import DemoOptions

Progress = Callable[[str, int, int], None]


def weight_agreement(merged: Path, ft: Path, base: Path, names: list[str]) -> dict[str, Any]:
    """How closely the merged weights reproduce the fine-tune, streamed:
    ‖merged − ft‖_F / ‖ft − base‖_F over `names` (the tensors the adapter changed).

    Returns {"rel_error", "max_abs_diff", "tensors"}."""
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


def output_agreement(merged: Path, ft: Path, base: Path, seed: int = 0) -> dict[str, float]:
    """Last hidden state / logits of merged vs fine-tune (and base vs fine-tune as the control).

    Returns {"merged_vs_ft_max_abs", "base_vs_ft_max_abs", "merged_vs_ft_cosine"}."""
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


def _extract(base: Path, ft: Path, out: Path, opts: DemoOptions, progress: Progress | None) -> tuple[Any, dict]:
    t0 = time.perf_counter()
    # bias="lora" (the default before bias="auto"): embeddings saved whole, so the demo's merged
    # model matches the fine-tune to the LoRA modules' reported error
    ex = extract_lora(base, ft, out, rank=opts.rank, bias="lora", overwrite=True, progress=progress)
    return ex, {"out": str(out), "modules": len(ex.modules), "adapter_params": ex.adapter_params,
                "full_params": ex.full_params, "overall_rel_error": ex.overall_rel_error,
                "seconds": time.perf_counter() - t0, "worst_module": max(ex.modules, key=lambda m: m.rel_error).module}


def _merge(base: Path, ft: Path, lora: Path, out: Path, ex: Any, progress: Progress | None) -> dict[str, Any]:
    """Merge, then measure the merged model against the fine-tune (weights the adapter changed, outputs)."""
    t0 = time.perf_counter()
    mg = merge(base, [lora], out, overwrite=True, progress=progress)
    t1 = time.perf_counter()
    changed = {n for n in mg.changed if n in open_checkpoint(base).tensors}
    names = [f"{m.module}.weight" for m in ex.modules if f"{m.module}.weight" in changed]
    return {"out": str(out), "changed": len(mg.changed), "seconds": t1 - t0,
            "weights_vs_ft": weight_agreement(out, ft, base, names), "outputs_vs_ft": output_agreement(out, ft, base)}


def _export(merged: Path, out: Path, opts: DemoOptions, progress: Progress | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    # logits-only for causal LMs too (the demo's validation rows and optimised file, as before the with-past default)
    exp = export_onnx(merged, out, optimize=opts.optimize, overwrite=True, progress=progress, cache=False)
    assert isinstance(exp, ExportResult)  # cache=False: never the with-past DecoderExport
    return {"out": str(out), "status": exp.status, "exporter": exp.exporter, "provider": exp.provider,
            "provider_note": exp.provider_note, "seconds": time.perf_counter() - t0,
            "validation": [r.__dict__ for r in exp.validation]}


def run_pipeline(base: str | Path, ft: str | Path, workdir: str | Path, options: DemoOptions | None = None, *,
                 progress: Progress | None = None, **fields: Any) -> dict[str, Any]:
    """extract-lora -> merge -> export-onnx (validated); everything lands under workdir
    (lora/, merged/, onnx/, each replaced on every run).

    Args:
        base, ft: a model directory and its fine-tune.
        workdir: where the adapter, the merged model and the ONNX files go.
        options: a DemoOptions; `fields` (rank=, optimize=) build it or replace fields of it.
        progress: callback(stage, done, total), handed to every phase.

    Returns:
        The report: {"base", "ft", "workdir", "rank", "extract": {...}, "merge": {...,
        "weights_vs_ft", "outputs_vs_ft"}, "export": {..., "validation": [rows]}, "seconds"}.

    Raises:
        OutputError: an output (lora/, merged/, onnx/ under WORKDIR) is or holds BASE or FT, or lies
            inside one; checked before the first phase.
        OptionError, CheckpointError, OutputError: as the phases do; ValidationError when the
        ONNX export fails validation (its files stay in workdir/onnx).

    Example:
        rep = run_pipeline("fixtures/tiny-bert", "fixtures/tiny-bert-ft", "out/demo", rank=4)
        rep["export"]["status"]   # "ok"
    """
    opts = DemoOptions.build(options, **fields)
    base, ft, workdir = Path(base), Path(ft), Path(workdir)
    t0 = time.perf_counter()
    lora, merged, onnx_dir = workdir / "lora", workdir / "merged", workdir / "onnx"
    for out in (lora, merged, onnx_dir):  # every output against both inputs before the first phase runs
        check_output_path(out, True, [base, ft])
    ex, extract_report = _extract(base, ft, lora, opts, progress)
    merge_report = _merge(base, ft, lora, merged, ex, progress)
    export_report = _export(merged, onnx_dir, opts, progress)
    return {"base": str(base), "ft": str(ft), "workdir": str(workdir), "rank": opts.rank,
            "extract": extract_report, "merge": merge_report, "export": export_report,
            "seconds": time.perf_counter() - t0}
