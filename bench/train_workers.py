"""Ray Train on a small CPU machine: 2 FSDP workers of one core each vs 1 worker with both
cores, at the same global batch (rows per optimizer step), on the same tuples, side by side
in one run. Each run trains `--steps` steps of the demo's LoRA student and reports the
median step time (the first step, which compiles and warms up, left out) and the wall time
of the whole `run_train` call (worker start, data, steps, checkpoint, export).

    .venv/bin/python bench/train_workers.py --data RUN/generate/tuples
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deliberate_ray.config import load_config, override  # noqa: E402
from deliberate_ray.train.run import run_train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--data", required=True, help="a generate run's tuples directory")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=4, help="rows per optimizer step")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_workers.json")
    a = p.parse_args()
    import ray

    cfg = load_config(a.config)
    assert cfg.train is not None
    cores = os.cpu_count() or 2
    layouts = {
        f"{cores} workers x 1 core (FSDP2 over gloo)": {
            "num_workers": cores,
            "micro_batch_size": a.global_batch // cores,
            "resources_per_worker": {"CPU": 1},
        },
        f"1 worker x {cores} cores": {
            "num_workers": 1,
            "micro_batch_size": a.global_batch,
            "resources_per_worker": {"CPU": cores},
        },
    }
    ray.init()
    out: dict = {
        "config": a.config,
        "steps": a.steps,
        "global_batch": a.global_batch,
        "load_avg_before": os.getloadavg(),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, layout) in enumerate(layouts.items()):
            changes = {"data": [a.data], "output_dir": tmp, "name": f"l{i}"} | layout
            tcfg = override(cfg.train, "train", **changes)
            t0 = time.perf_counter()
            result = run_train(tcfg, cfg.run_dir, stop_after=a.steps)
            wall = time.perf_counter() - t0
            rows = [json.loads(line) for line in open(result.metrics_path)]
            steps = [r["step_time_s"] for r in rows[1:]]
            out["runs"][label] = {
                "wall_s": round(wall, 1),
                "median_step_s": round(statistics.median(steps), 2),
                "tokens": sum(r["tokens"] for r in rows),
                "final_loss": round(rows[-1]["loss"], 4),
            }
            print(label, out["runs"][label], flush=True)
    first, second = out["runs"].values()
    out["step_speedup_1_worker"] = round(first["median_step_s"] / second["median_step_s"], 2)
    out["load_avg_after"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.out, "speedup", out["step_speedup_1_worker"])


if __name__ == "__main__":
    main()
