"""Causal LMs exported WITH a KV cache: real clients, decode speed, export cost (and a GPU check).

    python bench/bench_decoder.py clients            # ORTModelForCausalLM + onnxruntime-genai on our exports
    python bench/bench_decoder.py speed              # ms/token: with-past vs logits-only vs Optimum
    python bench/bench_decoder.py all                # both (results in bench/work/decoder/)
    python bench/bench_decoder.py gpu --out DIR      # bench/gpu_check.sh runs this on a CUDA machine

clients: every tiny architecture of tests/test_onnx_decoder.py is exported with
surgery.onnx.decoder, then decoded greedily (16 tokens, a left-padded batch of prompts of 3, 8
and 21 tokens) by the real clients, each in its own venv, and compared with PyTorch `generate`:
  (a) optimum-onnx 0.1.0  ORTModelForCausalLM.from_pretrained(OUT, use_cache=True).generate(...)
  (b) onnxruntime-genai   og.Model(OUT), a Generator loop
A missing venv is reported as "skipped", not as a failure. Make them with:
  python3 -m venv /tmp/venv-optimum && /tmp/venv-optimum/bin/pip install -c constraints.txt \
      torch==2.13.0 "optimum-onnx[onnxruntime]==0.1.0" "transformers<4.58"
  python3 -m venv /tmp/venv-genai && /tmp/venv-genai/bin/pip install onnxruntime-genai==0.18.0 numpy
(or point OPTIMUM_PYTHON / GENAI_PYTHON at other interpreters).

speed: one small Llama (4 layers, hidden 256, 8/4 heads, vocab 32000, random weights), 1 thread.
Greedy 32 tokens after a prompt of 16 / 240 / 1024 tokens, timed on the main venv's onnxruntime for
every graph (so only the graphs differ): our with-past export, our logits-only export
(surgery.onnx.export.export_onnx, task causal-lm: every step re-runs the whole sequence), and
Optimum's with-past export; plus PyTorch eager generate. Export wall time and peak RSS of ours
and Optimum's, each in a fresh process (os.wait4 rusage of that child: wall_s, cpu_s, peak_rss_mib),
and node counts of each graph as saved and as onnxruntime's CPU session runs it (ORT_ENABLE_ALL).
`--exporter auto dynamo legacy` times each of our exporters (auto keeps the ours_* names; the
others are ours_<exporter>_*); `--skip-logits` leaves out the slow logits-only graph:
    python bench/bench_decoder.py speed --exporter auto dynamo --contexts 16 240 --repeat 3

The peer subcommands (peer-optimum, peer-genai, export-optimum) run inside the peer venvs and
import nothing from surgery.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "decoder"
OPTIMUM_PY = os.environ.get("OPTIMUM_PYTHON", "/tmp/venv-optimum/bin/python")
GENAI_PY = os.environ.get("GENAI_PYTHON", "/tmp/venv-genai/bin/python")
NEW_TOKENS = 16
# *_mha: the same config with kv heads = heads. ORTModelForCausalLM (optimum-onnx 0.1.0) sizes the
# empty cache with num_key_value_heads only for a fixed list of model types (llama, mistral, qwen2,
# gemma, gemma3_text...); for phi3 and gemma2 it uses num_attention_heads, so a GQA export of those
# fails there, Optimum's own export included. Real Phi-3-mini has kv heads = heads.
CLIENT_ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "phi3_mha", "gemma", "gemma2", "gemma2_mha",
                "gemma3", "gpt2", "gpt_neox", "gptj", "falcon", "opt", "bloom"]
SPEED_CONTEXTS = (16, 240, 1024)
SPEED_NEW = 32


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return env


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run cmd in a fresh process: wall seconds, peak RSS (MiB) of that child, return code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    # cpu_s (user + system of the child) moves far less than wall_s when the cores are shared
    return {"wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
            "rc": os.waitstatus_to_exitcode(status), "log": str(log)}


def _peer(python: str, args: list[str]) -> dict:
    """Run a peer subcommand in its venv; its last stdout line is JSON."""
    if not Path(python).exists():
        return {"status": "skipped", "why": f"{python} not found (see this file's docstring)"}
    p = subprocess.run([python, __file__, *args], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"status": "error", "why": " | ".join(tail)[-300:]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- peers (run in their venvs)


def peer_optimum(a) -> None:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    spec = json.loads(Path(a.spec).read_text())
    model = ORTModelForCausalLM.from_pretrained(a.dir, use_cache=True, provider="CPUExecutionProvider")
    ids, mask = torch.tensor(spec["input_ids"]), torch.tensor(spec["attention_mask"])
    n = spec["new_tokens"]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         num_beams=1, pad_token_id=spec["pad"])
    import optimum.onnxruntime as oo

    print(json.dumps({"status": "ok", "tokens": out[:, ids.shape[1]:].tolist(),
                      "version": getattr(oo, "__version__", None) or _dist_version("optimum-onnx")}))


def peer_genai(a) -> None:
    import numpy as np
    import onnxruntime_genai as og

    spec = json.loads(Path(a.spec).read_text())
    # genai 0.18 takes a batch padded on the RIGHT with pad_token_id (its tokenizer's encode_batch
    # convention) and builds the attention mask itself; fed the left-padded batch it attends to
    # the padding (measured: its tokens then equal ours run with an all-ones mask).
    rows = [[t for t, m in zip(r, mr, strict=True) if m] for r, mr in zip(spec["input_ids"], spec["attention_mask"],
                                                                        strict=True)]
    width = max(map(len, rows))
    ids = np.array([r + [spec["pad"]] * (width - len(r)) for r in rows], dtype=np.int32)
    n = spec["new_tokens"]
    model = og.Model(a.dir)
    params = og.GeneratorParams(model)
    length = ids.shape[1] + n
    params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=ids.shape[0])
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    tokens = [list(map(int, gen.get_sequence(i)))[-n:] for i in range(ids.shape[0])]
    singles = []  # each prompt alone: no padding at all
    for r in rows:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(r) + n, min_length=len(r) + n, batch_size=1)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([r], dtype=np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        singles.append(list(map(int, gen.get_sequence(0)))[-n:])
    print(json.dumps({"status": "ok", "tokens": tokens, "single_tokens": singles,
                      "version": _dist_version("onnxruntime-genai")}))


def export_optimum(a) -> None:
    from optimum.exporters.onnx import main_export

    main_export(a.model, a.out, task="text-generation-with-past", device="cpu")
    print(json.dumps({"status": "ok"}))


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- clients (main venv)


def _reference(model, ids, mask, n: int, pad: int) -> list[list[int]]:
    import torch
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                          pad_token_id=pad)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    return out[:, ids.shape[1]:].tolist()


def clients(a) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import torch

    from surgery.core.hf import quiet
    from surgery.onnx.decoder import EXPORT_PAST, EXPORT_SEQ, export_decoder_with_past
    from surgery.onnx.decoder_check import _eos_ids, _left_pad, _pad_id, default_prompts
    from test_onnx_decoder import tiny  # the tests' tiny configs

    rows = []
    for arch in a.archs or CLIENT_ARCHS:
        model = tiny(arch.removesuffix("_mha"))
        if arch.endswith("_mha"):  # kv heads = heads: ORTModelForCausalLM 0.1.0 assumes it for these types
            cfg = model.config
            cfg.num_key_value_heads = cfg.num_attention_heads
            torch.manual_seed(0)
            model = type(model)(cfg).eval()
        out = WORK / "clients" / arch
        t0 = time.perf_counter()
        res = export_decoder_with_past(model, out, overwrite=True)
        eos = _eos_ids(model)
        pad = _pad_id(model, eos)
        prompts = default_prompts(model.config.vocab_size, [pad, *eos, model.config.bos_token_id or 0],
                                  EXPORT_SEQ + EXPORT_PAST)["left_padded"]
        ids, mask = _left_pad(prompts, pad)
        with quiet():
            ref = _reference(model, ids, mask, NEW_TOKENS, pad)
        spec = out.parent / f"{arch}.json"
        spec.write_text(json.dumps({"input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                                    "new_tokens": NEW_TOKENS, "pad": pad}))
        row = {"arch": arch, "export": res.exporter, "validation": res.status,
               "export_and_validate_s": round(time.perf_counter() - t0, 1), "prompt_lengths": [len(p) for p in prompts]}
        for peer, py, cmd in (("optimum", OPTIMUM_PY, "peer-optimum"), ("genai", GENAI_PY, "peer-genai")):
            got = _peer(py, [cmd, "--dir", str(out), "--spec", str(spec)])
            row[peer] = ("same tokens" if got.get("tokens") == ref else
                         "DIFFERENT tokens" if got.get("status") == "ok" else f"{got['status']}: {got['why']}")
            if "single_tokens" in got:  # genai: each prompt alone as well
                row[peer + "_single"] = "same tokens" if got["single_tokens"] == ref else "DIFFERENT tokens"
            row[f"{peer}_version"] = got.get("version")
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"new_tokens": NEW_TOKENS, "rows": rows}


# ----------------------------------------------------------------------------- speed (main venv)


def _make_llama(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def export_ours(a) -> None:
    sys.path.insert(0, str(ROOT))
    from surgery.onnx.decoder import export_decoder_with_past

    r = export_decoder_with_past(a.model, a.out, validate=not a.no_validate, overwrite=True, exporter=a.exporter)
    print(json.dumps({"status": r.status, "exporter": r.exporter, "export_s": r.export_seconds,
                      "note": r.exporter_note}))


def export_logits_only(a) -> None:
    sys.path.insert(0, str(ROOT))
    from surgery.onnx.export import export_onnx

    r = export_onnx(a.model, a.out, task="causal-lm", device="cpu", overwrite=True)
    print(json.dumps({"status": r.status, "exporter": r.exporter}))


def _session(path: Path, device: str = "cpu", threads: int = 1):
    from surgery.onnx.decoder_check import make_session

    return make_session(path, device, threads)[0]


def decode_with_past(sess, prompt, new: int) -> tuple[list[int], float, float]:
    """Greedy decode with the cache on onnxruntime (CPU): (tokens, prefill ms, mean ms per decode step);
    export-onnx --benchmark's loop (surgery.onnx.generation.ort_decode)."""
    from surgery.onnx.generation import ort_decode

    return ort_decode(sess, "CPUExecutionProvider", list(prompt), new)


def decode_logits_only(sess, prompt, new: int) -> tuple[list[int], float]:
    """Greedy decode re-running the whole sequence per token: (tokens, mean ms per token)."""
    import numpy as np

    seq = list(prompt)
    t0 = time.perf_counter()
    for _ in range(new):
        ids = np.array([seq], dtype=np.int64)
        logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):], (time.perf_counter() - t0) / new * 1e3


def torch_generate_ms(model, prompt, new: int, device: str = "cpu") -> tuple[list[int], float, float]:
    """PyTorch generate with the cache: (tokens, prefill ms, ms per decode step from t(new) - t(1));
    the timing export-onnx --benchmark uses (surgery.onnx.generation)."""
    import torch

    from surgery.onnx.generation import torch_generate_ms as timed

    return timed(model, prompt, new, torch.device(device))


def speed(a) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from surgery.core.hf import quiet

    torch.set_num_threads(1)
    base = WORK / "speed"
    model_dir = base / "llama-4x256"
    _make_llama(model_dir)
    me = [sys.executable, __file__]
    cost: dict[str, dict] = {}
    graphs: dict[str, Path] = {}
    for exp in a.exporter:  # "auto" keeps the earlier names (ours_*); the others are ours_<exporter>_*
        tag = "ours" if exp == "auto" else f"ours_{exp}"
        cmd = me + ["export-ours", "--model", str(model_dir), "--out", str(base / tag), "--exporter", exp]
        cost[f"{tag}_export_only"] = run_measured(cmd + ["--no-validate"], base / "logs" / f"{tag}.log")
        cost[f"{tag}_export_and_validate"] = run_measured(cmd, base / "logs" / f"{tag}_validate.log")
        graphs[f"{tag}_with_past"] = base / tag / "model.onnx"
    if not a.skip_logits:
        cost["logits_only_export_and_validate"] = run_measured(
            me + ["export-logits", "--model", str(model_dir), "--out", str(base / "logits")], base / "logs" / "logits.log")
    if Path(OPTIMUM_PY).exists():
        cost["optimum_main_export"] = run_measured([OPTIMUM_PY, __file__, "export-optimum", "--model", str(model_dir),
                                                    "--out", str(base / "optimum")], base / "logs" / "optimum.log")
    graphs["optimum_with_past"] = base / "optimum" / "model.onnx"
    sessions = {k: _session(p) for k, p in graphs.items() if p.is_file()}
    logits_path = base / "logits" / "model.onnx"
    logits_sess = _session(logits_path) if logits_path.is_file() and not a.skip_logits else None
    from transformers import AutoModelForCausalLM

    with quiet():
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    rows = []
    g = torch.Generator().manual_seed(1)
    for ctx in a.contexts:
        prompt = torch.randint(3, 32000, (ctx,), generator=g).tolist()
        row = {"context": ctx, "new_tokens": SPEED_NEW}
        # best of a.repeat runs each (the 2 cores are shared: the minimum is the least disturbed run)
        runs = [torch_generate_ms(model, prompt, SPEED_NEW) for _ in range(a.repeat)]
        ref = runs[0][0]
        row["torch_prefill_ms"], row["torch_ms_per_token"] = min(r[1] for r in runs), min(r[2] for r in runs)
        # the graphs take turns (order reversed every other round), so a slow spell on the shared
        # cores hits each of them rather than whichever ran then
        by_graph: dict[str, list] = {key: [] for key in sessions}
        for rep in range(a.repeat):
            order = list(sessions.items()) if rep % 2 == 0 else list(reversed(sessions.items()))
            for key, sess in order:
                by_graph[key].append(decode_with_past(sess, prompt, SPEED_NEW))
        for key, runs in by_graph.items():
            row[f"{key}_prefill_ms"], row[f"{key}_ms_per_token"] = min(r[1] for r in runs), min(r[2] for r in runs)
            row[f"{key}_median_ms_per_token"] = sorted(r[2] for r in runs)[len(runs) // 2]
            row[f"{key}_same_tokens"] = all(r[0] == ref for r in runs)
        if logits_sess is not None:
            runs = [decode_logits_only(logits_sess, prompt, SPEED_NEW) for _ in range(a.repeat if ctx < 1024 else 1)]
            row["logits_only_ms_per_token"] = min(r[1] for r in runs)
            row["logits_only_same_tokens"] = all(r[0] == ref for r in runs)
        rows.append(row)
        print(json.dumps(row), flush=True)
    sizes = {k: round(sum(f.stat().st_size for f in p.parent.iterdir() if "onnx" in f.name) / 2**20, 1)
             for k, p in graphs.items() if p.is_file()}
    return {"threads": 1, "export_cost": cost, "onnx_mib": sizes, "nodes": {k: graph_nodes(p) for k, p in graphs.items()
                                                                          if p.is_file()},
            "rows": rows, "load_avg": os.getloadavg()}


def graph_nodes(path: Path) -> dict[str, int]:
    """Node count of the saved graph and of onnxruntime's CPU session graph (ORT_ENABLE_ALL, the
    default level our sessions run at, written out with optimized_model_filepath)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3  # not the warning about saving an NCHWc-optimised graph
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        optimized = len(onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)
    return {"saved": len(onnx.load(str(path), load_external_data=False).graph.node), "ort_enable_all": optimized}


# ----------------------------------------------------------------------------- GPU (bench/gpu_check.sh)


def gpu(a) -> dict:
    import dataclasses

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from surgery.core.hf import quiet
    from surgery.errors import ValidationError
    from surgery.onnx.decoder import export_decoder_with_past
    from surgery.onnx.decoder_check import make_session
    from surgery.onnx.generation import ort_decode

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(a.scratch)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                      num_key_value_heads=max(1, a.hidden // 256), max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with quiet():
        model = LlamaForCausalLM(cfg).eval()  # random weights from the config: no download
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    onnx_dir = scratch / "llama-fp16"
    try:
        res = export_decoder_with_past(model, onnx_dir, dtype="fp16", device=a.device, overwrite=True,
                                       new_tokens=a.new_tokens)
        report, status = res.validation, res.status
    except ValidationError as e:  # the files are written; record the failure and still time them
        report, status = e.report, f"failed: {e}"
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    result = {"params": params, "export_and_validate_s": round(time.perf_counter() - t0, 1),
              "export_s": manifest["export_seconds"], "exporter": manifest["exporter"], "status": status,
              "validation": dataclasses.asdict(report) if report else None}
    (out / "gpu_validation.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "validation"}), flush=True)
    sess, provider, note = make_session(onnx_dir / "model.onnx", a.device)
    result["provider"], result["provider_note"] = provider, note
    fp16 = model.to(torch.float16)
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    fp16.to(tdev)
    rows = []
    g = torch.Generator().manual_seed(1)
    for ctx in a.contexts:
        prompt = torch.randint(3, 32000, (ctx,), generator=g).tolist()
        row = {"context": ctx, "new_tokens": SPEED_NEW}
        ref, row["torch_prefill_ms"], row["torch_ms_per_token"] = torch_generate_ms(fp16, prompt, SPEED_NEW, tdev)
        ort_decode(sess, provider, prompt, 2)  # warm-up; IOBinding (cache kept on the GPU) when CUDA loaded
        toks, row["ort_prefill_ms"], row["ort_ms_per_token"] = ort_decode(sess, provider, prompt, SPEED_NEW)
        row["ort_iobinding_device"] = "cuda" if provider == "CUDAExecutionProvider" else None
        row["same_tokens_as_torch"] = toks == ref
        row["first_difference"] = next((i for i, (x, y) in enumerate(zip(toks, ref, strict=False)) if x != y), None)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result["speed"] = rows
    result["versions"] = manifest["versions"]
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    return result


# ----------------------------------------------------------------------------- report


def _table(rows: list[dict], cols: list[str]) -> str:
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join(f"{r.get(c):.2f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("clients")
    c.add_argument("--archs", nargs="*")
    s = sub.add_parser("speed")
    al = sub.add_parser("all")
    al.add_argument("--archs", nargs="*")
    for p in (s, al):
        p.add_argument("--exporter", nargs="+", choices=["auto", "dynamo", "legacy"], default=["auto"],
                       help="our with-past export(s) to time; auto keeps the ours_* names, others ours_<exporter>_*")
        p.add_argument("--skip-logits", action="store_true", help="skip the (slow) logits-only graph")
        p.add_argument("--contexts", nargs="*", type=int, default=list(SPEED_CONTEXTS))
        p.add_argument("--repeat", type=int, default=3, help="decode runs per graph and context (best kept)")
    gp = sub.add_parser("gpu")
    gp.add_argument("--out", default=os.environ.get("OUT", str(WORK / "gpu")))
    gp.add_argument("--scratch", default="/tmp/surgery-gpu-check")
    gp.add_argument("--device", default="cuda", choices=["cuda", "auto", "cpu"])
    gp.add_argument("--new-tokens", type=int, default=32)
    gp.add_argument("--layers", type=int, default=24, help="24 x hidden 1024 = 0.43B params (vocab 32000)")
    gp.add_argument("--hidden", type=int, default=1024, help="heads = hidden/64, kv heads = hidden/256")
    gp.add_argument("--contexts", nargs="*", type=int, default=list(SPEED_CONTEXTS))
    for name in ("peer-optimum", "peer-genai"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
        p.add_argument("--spec", required=True)
    for name in ("export-optimum", "export-ours", "export-logits"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--no-validate", action="store_true")
        p.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "legacy"])
    a = ap.parse_args()
    simple = {"peer-optimum": peer_optimum, "peer-genai": peer_genai, "export-optimum": export_optimum,
              "export-ours": export_ours, "export-logits": export_logits_only}
    if a.cmd in simple:
        simple[a.cmd](a)
        return
    os.environ.update(_env())
    WORK.mkdir(parents=True, exist_ok=True)
    results = {}
    if a.cmd in ("clients", "all"):
        results["clients"] = clients(a)
        print(_table(results["clients"]["rows"], ["arch", "export", "validation", "optimum", "genai", "genai_single"]))
    if a.cmd in ("speed", "all"):
        results["speed"] = speed(a)
        keys = list(results["speed"]["nodes"])
        cols = (["context", "torch_ms_per_token"] + [f"{k}_ms_per_token" for k in keys] + ["logits_only_ms_per_token"]
                + [f"{k}_prefill_ms" for k in keys] + [f"{k}_same_tokens" for k in keys] + ["logits_only_same_tokens"])
        print(_table(results["speed"]["rows"], cols))
        print(json.dumps({k: results["speed"][k] for k in ("export_cost", "nodes", "onnx_mib")}, indent=1))
    if a.cmd == "gpu":
        results["gpu"] = gpu(a)
    if not a.cmd:
        ap.print_help()
        return
    (WORK / f"results-{a.cmd}.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
