"""Run a command and report the peak memory of it and all its descendants together.

Sums PSS (proportional set size) over the whole process tree every `--interval` seconds:
shared pages, Ray's plasma object store in /dev/shm among them, count once in total rather
than once per process that maps them. Ray's raylet, GCS and workers are descendants of the
driver when `ray.init()` starts a local cluster, so a local pipeline is fully covered. Also
recorded: the largest processes at the peak (where the memory is), and the machine's used
memory (MemTotal - MemAvailable, page cache excluded) at its own peak and before the start.

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


def tree_pss(root: psutil.Process) -> tuple[int, list[tuple[str, int]]]:
    """(bytes of PSS summed over root and descendants, (name, PSS) of each process)."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, []
    each = []
    for p in procs:
        try:
            each.append((p.name() or "?", p.memory_full_info().pss))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sum(pss for _, pss in each), each


def used() -> int:
    vm = psutil.virtual_memory()
    return vm.total - vm.available


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
    baseline = used()
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak, peak_each, peak_at, peak_used = 0, [], 0.0, 0
    while proc.poll() is None:
        pss, each = tree_pss(root)
        peak_used = max(peak_used, used())
        if pss > peak:
            peak, peak_each, peak_at = pss, each, time.time() - t0
        time.sleep(args.interval)
    largest = sorted(peak_each, key=lambda x: -x[1])[:12]
    result = {
        "command": cmd,
        "returncode": proc.returncode,
        "wall_s": round(time.time() - t0, 1),
        "peak_pss_gib": round(peak / 2**30, 3),
        "processes_at_peak": len(peak_each),
        "peak_at_s": round(peak_at, 1),
        "largest_at_peak_gib": [[name, round(b / 2**30, 3)] for name, b in largest],
        "machine_used_gib": {
            "before": round(baseline / 2**30, 2),
            "peak": round(peak_used / 2**30, 2),
        },
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
