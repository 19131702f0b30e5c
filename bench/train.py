"""Training throughput on this machine: the Ray Train loop against the same loop in one
process, and packing against padded batches, in real (non-pad) tokens per second.

Three runs of `run_train` on the same tuples (real ones from `runs/*/generate/tuples` when
there are enough, else synthetic ones with the generation stage's lengths: prompts of 20-60
tokens, CoT + answer of 60-250):
  ray-packed  2 Ray Train workers x 1 CPU (gloo, FSDP2), packing on
  plain       Ray Train local mode (num_workers=0): the same loop in this process, 2 threads,
              the same global batch (grad_accum=2 stands in for the second worker)
  ray-padded  as ray-packed, packing off (one example per row, padded to the batch's longest)
Tokens/s is the sum of real tokens over the sum of step times, first step (warm-up) left out.

    .venv/bin/python bench/train.py            # ~5 min on 2 cores with the embedded model
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from deliberate_ray.config import Config
from deliberate_ray.contracts import TUPLE, to_table
from deliberate_ray.models import EMBEDDED
from deliberate_ray.train import run_train
from deliberate_ray.train.data import tokenizer_for

ROOT = Path(__file__).resolve().parents[1]


def real_tuples(minimum: int) -> str | None:
    for folder in sorted(glob.glob(str(ROOT / "runs/*/generate/tuples"))):
        files = glob.glob(f"{folder}/*.parquet")
        if files and sum(pq.read_metadata(f).num_rows for f in files) >= minimum:
            return folder
    return None


def synthetic_tuples(model: str, n: int, path: Path, seed: int = 0) -> str:
    """Tuples whose token lengths follow the generation stage's: text cut from a word soup."""
    tok = tokenizer_for(model)
    rng = random.Random(seed)
    words = " ".join(
        json.loads(line)["prompt"] for line in (ROOT / "data/prompts/seed.jsonl").open()
    ).split()
    soup = tok(" ".join(rng.choices(words, k=20000)), add_special_tokens=False)["input_ids"]

    def text(n_tokens: int) -> str:
        start = rng.randrange(len(soup) - n_tokens)
        return tok.decode(soup[start : start + n_tokens]).strip()

    rows = []
    for i in range(n):
        cot_and_answer = rng.randint(60, 250)
        answer = rng.randint(20, min(80, cot_and_answer - 30))
        rows.append(
            {
                "id": f"bench-{i}",
                "messages": [{"role": "user", "content": text(rng.randint(20, 60))}],
                "cot": text(cot_and_answer - answer),
                "answer": text(answer),
                "category": "general",
            }
        )
    pq.write_table(to_table(rows, TUPLE), path)
    return str(path)


def tokens_per_s(metrics_path: str) -> tuple[float, int]:
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()][1:]
    return sum(r["tokens"] for r in rows) / sum(r["step_time_s"] for r in rows), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "runs/bench-train"), help="run folders")
    parser.add_argument("--result", default=str(ROOT / "bench/results/train.json"))
    args = parser.parse_args()

    import ray
    import torch

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # fresh runs: nothing to resume
    out.mkdir(parents=True)
    data = real_tuples(args.examples) or synthetic_tuples(
        args.model, args.examples, out / "tuples.parquet"
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    train = {
        "model": args.model,
        "data": [data],
        "max_seq_len": args.seq_len,
        "micro_batch_size": args.micro_batch,
        "max_steps": args.steps,
        "checkpoint_every": 10_000,
        "lr": 1e-5,
        "num_workers": 2,
    }
    runs: dict[str, dict[str, Any]] = {
        "ray-packed": {},
        "plain": {"num_workers": 0, "grad_accum": 2},
        "ray-padded": {"packing": False},
    }
    results: dict[str, Any] = {}
    load_before = os.getloadavg()[0]  # other processes on the machine skew every number
    for name, overrides in runs.items():
        cfg = Config.model_validate({"run_dir": str(out), "train": train | overrides})
        start = time.perf_counter()
        summary = run_train(cfg, name=name)
        rate, steps = tokens_per_s(summary["metrics_path"])
        results[name] = {
            "tokens_per_s": round(rate, 1),
            "measured_steps": steps,
            "rows": summary["data"]["rows"],
            "wall_s": round(time.perf_counter() - start, 1),
        }
        print(f"{name:11s} {rate:8.1f} real tokens/s  ({steps} steps, {results[name]})")
    ratio = results["ray-packed"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
    packing = results["ray-packed"]["tokens_per_s"] / results["ray-padded"]["tokens_per_s"]
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "load_avg_1min_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        },
        "data": os.path.relpath(data, ROOT),
        "args": vars(args),
        "runs": results,
        "ray_over_plain": round(ratio, 3),
        "packed_over_padded": round(packing, 3),
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(report, indent=2) + "\n")
    print(f"Ray Train / plain loop: {ratio:.2f}  (target >= 0.85)")
    print(f"packing / padded batches (real tokens/s): {packing:.2f}")
    print(f"written to {args.result}")


if __name__ == "__main__":
    main()
