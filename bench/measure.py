"""Run one command and record its wall time, peak RSS and the machine load.

    python bench/measure.py --label NAME [--log bench/work/results.jsonl] -- CMD ARGS...

Peak RSS is the child's ru_maxrss (resource.getrusage(RUSAGE_CHILDREN)): the largest
resident set of any waited-for descendant, i.e. the tool's own process here.
The load average (os.getloadavg) is recorded before and after, because the 2 cores are
shared and every number must be read next to the load it was measured under.
The command's stdout/stderr go to bench/work/logs/NAME.log; one JSON line is appended
to --log and printed. Exit status is the command's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--label", required=True)
    p.add_argument("--log", default=str(BENCH / "work" / "results.jsonl"))
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        p.error("no command given after --")
    logdir = BENCH / "work" / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(logdir / f"{a.label}.log", "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec = {
        "label": a.label,
        "cmd": " ".join(cmd),
        "rc": rc,
        "wall_s": round(wall, 2),
        "user_s": round(ru.ru_utime, 2),
        "sys_s": round(ru.ru_stime, 2),
        "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),  # ru_maxrss is KiB on Linux
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "nproc": os.cpu_count(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(a.log).parent.mkdir(parents=True, exist_ok=True)
    with open(a.log, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
