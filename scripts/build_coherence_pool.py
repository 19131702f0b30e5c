"""Collect real replies of the embedded model for labelling the coherence grader.

Two sources, both this project's own prompts (data/prompts/seed.jsonl), never a benchmark:
- a generate run's teacher answers (spec in context, the demo's sampling), from its samples/
  and the answers of its truncated quarantine rows;
- fresh replies of the untrained model with no spec, sampled at several temperatures (high
  temperatures are where a 135M model loops, drifts into other scripts and emits markup).

Writes JSONL rows (`id`, `source`, `temperature`, `prompt`, `reply`) in a seeded random
order; data/graders/coherence_labels.jsonl holds a labelled sample of them (rules in
data/graders/README.md).

    .venv/bin/python scripts/build_coherence_pool.py --run runs/demo/generate \\
        --out /tmp/coherence_pool.jsonl
"""

from __future__ import annotations

import argparse
import glob
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def teacher_answers(run: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for r in pq.read_table(glob.glob(str(run / "samples" / "*.parquet"))).to_pylist():
        rows.append(
            {
                "id": f"{r['id']}/{r['sample_index']}",
                "source": "teacher_answer",
                "temperature": None,
                "prompt": r["messages"][-1]["content"],
                "reply": r["answer"],
            }
        )
    for q in pq.read_table(glob.glob(str(run / "quarantine" / "*.parquet"))).to_pylist():
        raw = json.loads(q["raw"])
        if q["reason"] == "truncated" and raw.get("answer"):
            rows.append(
                {
                    "id": f"{raw['id']}/{raw['sample_index']}",
                    "source": "teacher_answer_truncated",
                    "temperature": None,
                    "prompt": raw["messages"][-1]["content"],
                    "reply": raw["answer"],
                }
            )
    return rows


def base_replies(
    n_prompts: int, temperatures: list[float], max_tokens: int, seed: int
) -> list[dict]:
    import ray

    from deliberate_ray.config import EngineConfig, SamplingConfig
    from deliberate_ray.engines import apply_engine, resolve_engine
    from deliberate_ray.engines.rows import sampling_params

    path = ROOT / "data/prompts/seed.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    prompts = random.Random(seed).sample(records, n_prompts)
    items = []
    for t in temperatures:
        params = sampling_params(SamplingConfig(max_tokens=max_tokens, temperature=t, top_p=1.0))
        for i, p in enumerate(prompts):
            items.append(
                {
                    "id": f"seed{seed}-{i:02d}/t{t:g}",
                    "temperature": t,
                    # not `prompt`: ray.data.llm's chat-template stage writes that column
                    "question": p["prompt"],
                    "messages": [{"role": "user", "content": p["prompt"]}],
                    "sampling_params": params,
                }
            )
    engine = resolve_engine(
        EngineConfig(kind="auto", model="embedded:smollm2-135m-instruct", batch_size=64),
        "coherence pool",
    )
    ray.init(ignore_reinit_error=True)
    out = apply_engine(ray.data.from_items(items), engine, keep=["id", "temperature", "question"])
    return [
        {
            "id": r["id"],
            "source": f"base_no_spec_{engine.kind}",
            "temperature": r["temperature"],
            "prompt": r["question"],
            "reply": r["generated_text"] or "",
        }
        for r in out.take_all()
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a generate output dir (samples/, quarantine/)")
    p.add_argument("--prompts", type=int, default=30, help="seed prompts for base replies")
    p.add_argument("--temperatures", default="1.0,1.5,2.0")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=11, help="which seed prompts are drawn")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    rows = teacher_answers(a.run) if a.run else []
    temps = [float(t) for t in a.temperatures.split(",") if t]
    if a.prompts and temps:
        rows += base_replies(a.prompts, temps, a.max_tokens, a.seed)
    random.Random(a.seed).shuffle(rows)
    a.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} replies -> {a.out}")


if __name__ == "__main__":
    main()
