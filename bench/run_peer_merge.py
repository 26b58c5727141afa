"""Merge benchmark: the PEFT baseline, the `cp -r` I/O floor, and (hook) surgery merge.

    python bench/run_peer_merge.py [--pair bench/work/llama] [--adapter DIR] [--repeat 2]

Each run is a fresh process measured by bench/measure.py (wall time, peak RSS of the
child, load average before/after); results are appended to bench/work/results.jsonl.

  cp           `cp -r BASE OUT`, run --repeat times (the first one warms the page cache;
               nothing is dropped from the cache, read the last)
  peft         python bench/run_peer_merge.py --child-peft BASE ADAPTER OUT:
               AutoModelForCausalLM.from_pretrained(bf16) -> PeftModel.from_pretrained
               -> merge_and_unload() -> save_pretrained(OUT); the child prints its phases
  surgery      hook: runs only with SURGERY_MERGE_CMD set, e.g.
               SURGERY_MERGE_CMD='.venv/bin/surgery merge {base} {adapter} -o {out}'
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PY = sys.executable


def child_peft(base: str, adapter: str, out: str) -> None:
    t0 = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t1 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    t2 = time.perf_counter()
    model = PeftModel.from_pretrained(model, adapter)
    t3 = time.perf_counter()
    model = model.merge_and_unload()
    t4 = time.perf_counter()
    model.save_pretrained(out)
    t5 = time.perf_counter()
    print(json.dumps({"import_s": round(t1 - t0, 2), "load_base_s": round(t2 - t1, 2),
                      "load_adapter_s": round(t3 - t2, 2), "merge_s": round(t4 - t3, 2),
                      "save_s": round(t5 - t4, 2)}), flush=True)


def measured(label: str, cmd: list[str]) -> dict:
    out = subprocess.run([PY, str(BENCH / "measure.py"), "--label", label, "--", *cmd],
                         capture_output=True, text=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{label}: {rec['wall_s']} s, peak RSS {rec['peak_rss_mb']} MB, rc {rec['rc']}, "
          f"load {rec['load_before'][0]}->{rec['load_after'][0]}", flush=True)
    return rec


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--child-peft", nargs=3, metavar=("BASE", "ADAPTER", "OUT"))
    p.add_argument("--pair", default=str(BENCH / "work" / "llama"))
    p.add_argument("--adapter", help="default: PAIR/lora-r16")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--tag", default="llama", help="label prefix")
    p.add_argument("--skip", nargs="*", default=[], choices=["cp", "peft", "surgery"])
    a = p.parse_args()
    if a.child_peft:
        child_peft(*a.child_peft)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = str(Path(a.pair) / "base")
    adapter = a.adapter or str(Path(a.pair) / "lora-r16")
    outroot = BENCH / "work" / "out"
    outroot.mkdir(parents=True, exist_ok=True)

    def fresh(name: str) -> str:
        d = outroot / name
        if d.exists():
            shutil.rmtree(d)
        return str(d)

    if "cp" not in a.skip:
        for i in range(1, a.repeat + 1):
            measured(f"{a.tag}-cp-{i}", ["cp", "-r", base, fresh(f"{a.tag}-cp")])
    if "peft" not in a.skip:
        for i in range(1, a.repeat + 1):
            measured(f"{a.tag}-peft-merge-{i}",
                     [PY, __file__, "--child-peft", base, adapter, fresh(f"{a.tag}-peft-merged")])
            log = (BENCH / "work" / "logs" / f"{a.tag}-peft-merge-{i}.log").read_text().strip()
            print("  phases:", log.splitlines()[-1] if log else "(no output)")
    # ---- hook for surgery's own merge (the lead fills the command once the CLI exists) ----
    cmd_t = os.environ.get("SURGERY_MERGE_CMD")
    if "surgery" not in a.skip and cmd_t:
        for i in range(1, a.repeat + 1):
            cmd = cmd_t.format(base=base, adapter=adapter, out=fresh(f"{a.tag}-surgery-merged"))
            measured(f"{a.tag}-surgery-merge-{i}", shlex.split(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
