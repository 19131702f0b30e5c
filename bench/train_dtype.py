"""One SFT step of the demo's student on CPU, fp32 vs bf16 autocast, side by side.

The demo config's model and LoRA, one row of `--tokens` tokens, forward + backward + AdamW
step on `--threads` torch threads (a Ray Train worker of the 2-core demo has one core). The
two dtypes alternate, `--repeats` rounds of `--steps` steps each after a warm-up step; the
result is the median step time of each and their ratio.

    .venv/bin/python bench/train_dtype.py --out bench/results/train_dtype.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from deliberate_ray.config import load_config
from deliberate_ray.engines.select import cpu_dtype
from deliberate_ray.train.parallelize import apply_lora, load_base_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_dtype.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = load_config(a.config).train
    model = load_base_model(cfg.model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (1, a.tokens))

    def step(dtype: str) -> float:
        start = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(a.repeats):
        for dtype in times:
            step(dtype)  # warm-up
            times[dtype] += [step(dtype) for _ in range(a.steps)]
    med = {d: statistics.median(t) for d, t in times.items()}
    result = {
        "config": a.config,
        "lora": cfg.lora.enabled,
        "tokens": a.tokens,
        "threads": a.threads,
        "cpu_native_bf16": cpu_dtype() == "bfloat16",
        "median_step_s": {d: round(v, 3) for d, v in med.items()},
        "speedup_bf16": round(med["fp32"] / med["bf16"], 2),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
