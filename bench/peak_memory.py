"""Run a command and report the peak memory of it and all its descendants together.

Sums PSS (proportional set size) over the whole process tree every `--interval` seconds:
shared pages, Ray's plasma object store in /dev/shm among them, count once in total rather
than once per process that maps them. Ray's raylet, GCS and workers are descendants of the
driver when `ray.init()` starts a local cluster, so a local pipeline is fully covered.

    python bench/peak_memory.py --out bench/results/demo_memory.json -- \
        .venv/bin/deliberate-ray pipeline --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil


def tree_pss(root: psutil.Process) -> tuple[int, int]:
    """(bytes of PSS summed over root and descendants, number of processes)."""
    total, count = 0, 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak, peak_procs, peak_at = 0, 0, 0.0
    while proc.poll() is None:
        pss, n = tree_pss(root)
        if pss > peak:
            peak, peak_procs, peak_at = pss, n, time.time() - t0
        time.sleep(args.interval)
    result = {
        "command": cmd,
        "returncode": proc.returncode,
        "wall_s": round(time.time() - t0, 1),
        "peak_pss_gib": round(peak / 2**30, 3),
        "processes_at_peak": peak_procs,
        "peak_at_s": round(peak_at, 1),
        "machine": f"{platform.machine()} {psutil.cpu_count()} CPU(s), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "load_avg_at_end": [round(x, 2) for x in psutil.getloadavg()],
    }
    print(json.dumps(result, indent=2), file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
