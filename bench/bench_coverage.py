"""Export coverage: `surgery export-onnx` vs `optimum-cli export onnx` over architecture x head rows.

    .venv/bin/python bench/bench_coverage.py                          # every row, bench/work/coverage
    .venv/bin/python bench/bench_coverage.py --only 'bert|roberta' --json out.json
    .venv/bin/python bench/bench_coverage.py --no-optimum             # surgery only (after a merge)

Each row is a tiny random model (fixed seed) built from a transformers config class
(fixtures/zoo.py, fixtures/zoo_extra.py), saved to OUT/models/ROW, then exported by both tools in
subprocesses, one thread each (OMP_NUM_THREADS=1), with a per-export timeout:

- surgery: `python -m surgery export-onnx DIR -o OUT --task T --device cpu`; ok = exit 0, manifest
  status ok and validation passed; "refused" = a one-line error and no ONNX file written; "failed"
  = anything else (validation failed, crash, timeout).
- Optimum: `optimum-cli export onnx --model DIR --task T OUT` (its own venv: optimum-onnx pins
  transformers < 4.58); ok = exit 0, no atol/output-match warning (Optimum only warns on those) and
  every .onnx it wrote loads in onnxruntime.
- heads intact: every written .onnx is loaded in onnxruntime and the head's outputs must be there
  with the head's size (logits last dim = num_labels or vocab_size; last_hidden_state = hidden
  size; QA/multiple-choice/zero-shot: the outputs by name).

Prints a markdown table and a summary; --json writes every measurement (and load averages). Times
are wall seconds of the whole command (load, export, validation): read them next to the load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
OPTIMUM = "/tmp/venv-optimum/bin/optimum-cli"
#: what `--task auto` must resolve to on a seq2seq row (BART's head is also listed as fill-mask)
SEQ2SEQ_TASKS = r"text2text|seq2seq|speech|generation"
CAUSAL = ("text-generation-with-past", "text-generation-with-past")


@dataclass(frozen=True)
class Row:
    """One coverage row: a zoo model, surgery's task for it, Optimum's, and what kind of row it is
    (seq2seq and moe rows wait on other branches)."""

    name: str
    model: str
    ours: str
    optimum: str
    kind: str = ""


def _rows() -> list[Row]:
    causal = ["llama", "llama-tied", "qwen2", "qwen3", "mistral", "phi3", "phi", "gemma", "gemma2", "gemma3",
              "gpt2", "gpt-neox", "gptj", "opt", "falcon", "bloom", "granite", "olmo2"]
    rows = [Row(n, n, *CAUSAL) for n in causal]
    same = {  # row/model -> task (same name in both tools)
        "bert": "feature-extraction", "bert-cls": "text-classification", "bert-mlm": "fill-mask",
        "bert-tok": "token-classification", "bert-qa": "question-answering", "bert-mc": "multiple-choice",
        "roberta-mlm": "fill-mask", "roberta-cls": "text-classification", "roberta-tok": "token-classification",
        "roberta-qa": "question-answering", "roberta-mc": "multiple-choice",
        "xlm-roberta-mlm": "fill-mask", "xlm-roberta-cls": "text-classification",
        "deberta-v2-mlm": "fill-mask", "deberta-v2-cls": "text-classification",
        "deberta-v2-tok": "token-classification", "deberta-v2-qa": "question-answering",
        "distilbert": "feature-extraction", "distilbert-mlm": "fill-mask", "distilbert-cls": "text-classification",
        "distilbert-tok": "token-classification", "distilbert-qa": "question-answering",
        "modernbert-mlm": "fill-mask", "modernbert-cls": "text-classification",
        "modernbert-tok": "token-classification",
        "electra-mlm": "fill-mask", "electra-cls": "text-classification", "electra-tok": "token-classification",
        "albert-mlm": "fill-mask", "mpnet-cls": "text-classification",
        "llama-cls": "text-classification", "gpt2-cls": "text-classification",
        "vit": "image-classification", "convnext": "image-classification", "resnet": "image-classification",
        "swin": "image-classification",
        "wav2vec2": "feature-extraction", "wav2vec2-ctc": "automatic-speech-recognition",
        "wav2vec2-cls": "audio-classification",
        "clip": "zero-shot-image-classification", "siglip": "zero-shot-image-classification",
    }
    rows += [Row(n, n, t, t) for n, t in same.items()]
    rows.append(Row("vit-base", "vit-base", "image-feature-extraction", "feature-extraction"))
    # seq2seq: surgery's task name is not settled yet, so auto (the head config.json names)
    rows += [Row(n, n, "auto", "text2text-generation-with-past", "seq2seq") for n in ("t5", "bart", "marian")]
    rows.append(Row("whisper", "whisper-1500", "auto", "automatic-speech-recognition-with-past", "seq2seq"))
    rows += [Row(n, n, *CAUSAL, "moe") for n in ("mixtral", "olmoe", "qwen2-moe", "qwen3-moe")]
    return rows


ROWS = _rows()


# ----------------------------------------------------------------------------- heads


def expected_head(model_name: str, task: str) -> dict[str, int | None]:
    """{output name: expected last dim (None: by name only)} of the row's head, from its config."""
    import transformers

    from fixtures.zoo_extra import entry

    _, config_cls, kwargs = entry(model_name)
    config = getattr(transformers, config_cls)(**kwargs)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if task in ("fill-mask", "automatic-speech-recognition") or "generation" in task or task == "auto":
        return {"logits": vocab}
    if task in ("text-classification", "token-classification", "image-classification", "audio-classification"):
        return {"logits": config.num_labels}
    if task == "question-answering":
        return {"start_logits": None, "end_logits": None}
    if task == "multiple-choice":
        return {"logits": None}
    if task == "zero-shot-image-classification":
        return {"logits_per_image": None, "logits_per_text": None}
    return {"last_hidden_state": hidden if model_name != "vit-base" else None}


def onnx_outputs(out_dir: Path) -> tuple[dict[str, list[Any]], str | None]:
    """({output name: shape} over every .onnx written (model*_int8/_optimized skipped), error when one
    does not load in onnxruntime)."""
    import onnxruntime as ort

    found: dict[str, list[Any]] = {}
    files = sorted(p for p in out_dir.glob("*.onnx") if not re.search(r"_(int8|optimized)\.onnx$", p.name))
    if not files:
        return found, "no .onnx file written"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for path in files:
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - reported in the table
            return found, f"{path.name} does not load in onnxruntime: {_first(str(e))}"
        for o in sess.get_outputs():
            found.setdefault(o.name, list(o.shape))
    return found, None


def head_intact(found: dict[str, list[Any]], expected: dict[str, int | None]) -> str:
    """"yes", or what is missing/mis-sized."""
    for name, dim in expected.items():
        if name not in found:
            return f"no {name}"
        last = found[name][-1] if found[name] else None
        if dim is not None and last != dim:
            return f"{name}[-1]={last}, head {dim}"
    return "yes"


# ----------------------------------------------------------------------------- running


@dataclass
class Result:
    row: str
    task: str
    optimum_task: str
    kind: str
    surgery: str = "skipped"
    surgery_reason: str = ""
    surgery_s: float | None = None
    surgery_head: str = ""
    optimum: str = "skipped"
    optimum_reason: str = ""
    optimum_s: float | None = None
    optimum_head: str = ""
    note: str = ""
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)


def _first(text: str, width: int = 110) -> str:
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    return line[:width]


def _last_error(text: str) -> str:
    """The line that says why a command failed: surgery's `error:` line, else the last exception line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith(("error", "surgery: error")):
            return ln[:110]
    exc = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln)]
    return (exc[-1] if exc else (lines[-1] if lines else ""))[:110]


def _run(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, float, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, out = proc.returncode, proc.stdout + "\n" + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += f"\ntimeout after {timeout:.0f} s"
    wall = time.perf_counter() - t0
    log.write_text(" ".join(cmd) + "\n" + out)
    return rc, wall, out


def _validated(v: dict[str, Any]) -> bool:
    """The manifest's validation passed (a decoder with past lists rows and token mismatches)."""
    if "passed" in v:
        return bool(v["passed"])
    rows = v.get("rows") or []
    return bool(rows) and all(r.get("passed") for r in rows) and not v.get("error") and not v.get("mismatches")


def run_surgery(row: Row, model_dir: Path, out: Path, res: Result, timeout: float, expected: dict) -> None:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "surgery", "export-onnx", str(model_dir), "-o", str(out), "--task", row.ours,
           "--device", "cpu"]
    rc, res.surgery_s, text = _run(cmd, timeout, out.with_suffix(".log"))
    manifest = out / "manifest.json"
    m = json.loads(manifest.read_text()) if manifest.is_file() else {}
    validated = _validated(m.get("validation") or {})
    if rc == 0 and m.get("status") == "ok" and validated:
        res.surgery = "ok"
        if row.ours == "auto":
            res.note = f"auto -> {m.get('task')}"
        if row.kind == "seq2seq" and not re.search(SEQ2SEQ_TASKS, str(m.get("task"))):
            res.surgery, res.surgery_reason = "wrong task", f"auto -> {m.get('task')}, not a generation task"
    else:
        written = any(out.glob("*.onnx")) if out.is_dir() else False
        res.surgery_reason = "timeout" if rc is None else _last_error(text)
        crashed = rc is None or written or "Traceback" in text or "--debug" in text
        res.surgery = "failed" if crashed or "failed" in res.surgery_reason else "refused"
    if res.surgery == "ok":
        found, err = onnx_outputs(out)
        res.surgery_head = err or head_intact(found, expected)


def run_optimum(row: Row, model_dir: Path, out: Path, res: Result, timeout: float, expected: dict,
                optimum: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [optimum, "export", "onnx", "--model", str(model_dir), "--task", row.optimum, str(out)]
    rc, res.optimum_s, text = _run(cmd, timeout, out.with_suffix(".log"))
    if rc != 0:
        res.optimum = "failed"
        res.optimum_reason = "timeout" if rc is None else _last_error(text)
        return
    found, err = onnx_outputs(out)
    warned = re.search(r"succeeded with the warning: (.*)", text)
    if err:
        res.optimum, res.optimum_reason = "failed", err
    elif warned:
        res.optimum, res.optimum_reason = "not validated", _first(warned.group(1))
    else:
        res.optimum = "ok"
    if not err:
        res.optimum_head = head_intact(found, expected)


def run_row(row: Row, args: argparse.Namespace) -> Result:
    from transformers.utils import logging as hf_logging

    from fixtures.zoo_extra import build_extra

    hf_logging.disable_progress_bar()
    res = Result(row.name, row.ours, row.optimum, row.kind, load_before=list(os.getloadavg()))
    model_dir = args.out / "models" / row.name
    shutil.rmtree(model_dir, ignore_errors=True)  # rebuilt every run (under a second): never a stale config
    build_extra(row.model, model_dir, seed=0)
    expected = expected_head(row.model, row.ours)
    if not args.no_surgery:
        run_surgery(row, model_dir, args.out / "surgery" / row.name, res, args.timeout, expected)
    if not args.no_optimum:
        run_optimum(row, model_dir, args.out / "optimum" / row.name, res, args.timeout, expected, args.optimum)
    res.load_after = list(os.getloadavg())
    if row.kind and res.surgery != "ok":
        res.note = res.note or f"{row.kind}: waits on its branch"
    print(f"  {row.name}: surgery {res.surgery} {_fmt(res.surgery_s)}s, optimum {res.optimum} {_fmt(res.optimum_s)}s",
          file=sys.stderr, flush=True)
    return res


# ----------------------------------------------------------------------------- report


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _cell(status: str, reason: str) -> str:
    text = status + (f": {reason}" if reason else "")
    return text.replace("|", "\\|")


def table(results: list[Result]) -> str:
    lines = ["| row | task | surgery | surgery s | optimum | optimum s | heads intact (surgery/optimum) | note |",
             "|---|---|---|---:|---|---:|---|---|"]
    for r in results:
        task = r.task if r.task == r.optimum_task else f"{r.task} / {r.optimum_task}"
        heads = f"{r.surgery_head or '-'} / {r.optimum_head or '-'}"
        lines.append(f"| {r.row} | {task} | {_cell(r.surgery, r.surgery_reason)} | {_fmt(r.surgery_s)} | "
                     f"{_cell(r.optimum, r.optimum_reason)} | {_fmt(r.optimum_s)} | {heads} | {r.note} |")
    return "\n".join(lines)


def summary(results: list[Result]) -> dict[str, Any]:
    ours = [r for r in results if r.surgery == "ok"]
    theirs = [r for r in results if r.optimum == "ok"]
    both = [r for r in results if r.surgery == "ok" and r.optimum == "ok" and r.surgery_s and r.optimum_s]
    ratios = [r.surgery_s / r.optimum_s for r in both]  # type: ignore[operator]
    return {
        "rows": len(results),
        "surgery_ok": len(ours),
        "optimum_ok": len(theirs),
        "heads_intact_surgery": sum(r.surgery_head == "yes" for r in ours),
        "optimum_not_surgery": [r.row for r in theirs if r.surgery != "ok"],
        "surgery_not_optimum": [r.row for r in ours if r.optimum != "ok"],
        "bugs": [r.row for r in theirs if r.surgery != "ok" and not r.kind],
        "median_time_ratio": round(statistics.median(ratios), 2) if ratios else None,
        "time_ratio_rows": len(ratios),
    }


def summary_text(s: dict[str, Any]) -> str:
    return (f"rows {s['rows']}; exported+validated: surgery {s['surgery_ok']} (heads intact "
            f"{s['heads_intact_surgery']}), Optimum {s['optimum_ok']}; Optimum but not surgery "
            f"({len(s['optimum_not_surgery'])}): {', '.join(s['optimum_not_surgery']) or '-'}; surgery but not "
            f"Optimum ({len(s['surgery_not_optimum'])}): {', '.join(s['surgery_not_optimum']) or '-'}; median "
            f"time ratio surgery/Optimum {s['median_time_ratio']} over {s['time_ratio_rows']} rows")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="regex on row names (re.search)")
    ap.add_argument("--jobs", type=int, default=1, help="rows run at once (default 1: timings)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "work" / "coverage")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per export")
    ap.add_argument("--optimum", default=OPTIMUM, help="optimum-cli path (its own venv)")
    ap.add_argument("--no-optimum", action="store_true", help="surgery only")
    ap.add_argument("--no-surgery", action="store_true", help="Optimum only")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--report", type=Path, help="print the table of an earlier --json file and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    rows = [r for r in ROWS if not args.only or re.search(args.only, r.name)]
    if args.list:
        for r in rows:
            print(f"{r.name}\t{r.model}\t{r.ours}\t{r.optimum}\t{r.kind}")
        return 0
    if not rows:
        ap.error(f"--only {args.only!r} matches no row")
    for sub in ("models", "surgery", "optimum"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    done: list[Result] = []
    lock = threading.Lock()

    def one(row: Row) -> Result:
        res = run_row(row, args)
        with lock:  # the JSON holds every finished row, so an interrupted run still reports
            done.append(res)
            write_json(args, done, t0)
        return res

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, rows))
    write_json(args, results, t0)
    print(table(results))
    print()
    print(summary_text(summary(results)))
    return 0


def write_json(args: argparse.Namespace, results: list[Result], t0: float) -> None:
    """--json: the summary, every row measured so far, the jobs and the wall time."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary(results), "rows": [asdict(r) for r in results],
                                         "jobs": args.jobs, "wall_s": round(time.time() - t0, 1),
                                         "cpus": os.cpu_count()}, indent=1))


def report(path: Path) -> str:
    """The table and summary of a --json file (a finished or an interrupted run)."""
    data = json.loads(path.read_text())
    results = [Result(**r) for r in data["rows"]]
    order = {r.name: i for i, r in enumerate(ROWS)}
    results.sort(key=lambda r: order.get(r.row, len(order)))
    return table(results) + "\n\n" + summary_text(summary(results))


if __name__ == "__main__":
    sys.exit(main())
