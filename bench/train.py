"""Training throughput on this machine: the Ray Train loop against the same loop in one
process, FSDP2 over 2 CPU workers, and packing against padded batches, in real (non-pad)
tokens per second.

Runs of `run_train` on the same tuples (real ones from `runs/*/generate/tuples` when there
are enough, else synthetic ones with the generation stage's lengths: prompts of 20-60
tokens, CoT + answer of 60-250), all with the same global batch of 4 rows:
  plain          Ray Train local mode (num_workers=0): the loop in this process, 2 threads
  ray-1x2        1 Ray Train worker with 2 CPUs (2 threads): plain plus Ray Train's overhead
  ray-2x1        2 Ray Train workers x 1 CPU (gloo, FSDP2): the default layout
  ray-2x1-padded as ray-2x1, packing off (one example per row, padded to the batch's longest)
Each run's first step (warm-up) is left out. The runs alternate over `--rounds`, and each
configuration is reported by its fastest step (other processes on a shared machine only
slow steps down) and its median step, in real tokens / step time.

    .venv/bin/python bench/train.py       # ~15 min on 2 cores with the embedded model
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import shutil
from pathlib import Path
from statistics import median
from typing import Any

import pyarrow.parquet as pq

from deliberate_ray.config import TrainConfig
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


def step_rates(metrics_path: str) -> list[float]:
    """Real tokens/s of each step but the first (warm-up)."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()][1:]
    return [r["tokens"] / r["step_time_s"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
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
    # One process takes the 2 workers' micro-batches one after the other (grad_accum=2).
    runs: dict[str, dict[str, Any]] = {
        "plain": {"num_workers": 0, "grad_accum": 2},
        "ray-1x2": {"num_workers": 1, "resources_per_worker": {"CPU": 2}, "grad_accum": 2},
        "ray-2x1": {},
        "ray-2x1-padded": {"packing": False},
    }
    rates: dict[str, list[float]] = {name: [] for name in runs}
    load = [os.getloadavg()[0]]  # other processes on the machine slow steps down
    for round_ in range(args.rounds):  # alternate, so a burst of load does not hit one only
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            section = TrainConfig.model_validate(train | runs[name] | {"name": f"{name}-{round_}"})
            summary = run_train(section, str(out))
            rates[name] += step_rates(summary.metrics_path)
            load.append(os.getloadavg()[0])
            print(f"round {round_} {name:11s} steps at {[round(r, 1) for r in rates[name]]} tok/s")
    # The fastest step is the one least slowed by others; the median is shown beside it.
    results = {
        name: {"best_tokens_per_s": round(max(r), 1), "median_tokens_per_s": round(median(r), 1)}
        for name, r in rates.items()
    }
    best = {name: r["best_tokens_per_s"] for name, r in results.items()}
    ratios = {
        "ray_1x2_over_plain": round(best["ray-1x2"] / best["plain"], 3),
        "ray_2x1_fsdp_over_plain": round(best["ray-2x1"] / best["plain"], 3),
        "packed_over_padded": round(best["ray-2x1"] / best["ray-2x1-padded"], 3),
    }
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "plain_loop_torch_threads": torch.get_num_threads(),
            "load_avg_1min_between_runs": [round(x, 1) for x in load],
        },
        "data": os.path.relpath(data, ROOT),
        "args": vars(args),
        "runs": results,
        **ratios,
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(report, indent=2) + "\n")
    print(f"Ray Train (1 worker x 2 CPUs) / plain loop: {ratios['ray_1x2_over_plain']:.2f}")
    print(f"FSDP2 on 2 workers x 1 CPU / plain loop: {ratios['ray_2x1_fsdp_over_plain']:.2f}")
    print(f"packing / padded batches: {ratios['packed_over_padded']:.2f}")
    print(f"written to {args.result}")


if __name__ == "__main__":
    main()
