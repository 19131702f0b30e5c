"""Collect real model replies to the agentic suite (data/eval/agentic.jsonl), for hand-labelling
the agentic grader (data/graders/agentic_labels.jsonl, bench/agentic_grader.py).

Each model answers every scenario's `messages` (its own chat template) in one offline vLLM
engine, with the eval's decoding settings: greedy with repetition penalty 1.1 (the eval's
advice for the 135M models, docs/serve-eval.md) and `--samples` samples at `--temperature`.
Models: the embedded base model, and trained exports given as NAME=PATH (by default every
`runs/*/train/*/export`, named after the arm).

Writes JSONL rows (`id`, `scenario`, `model`, `setting`, `finish_reason`, `harm_type`,
`expected`, `reply`), one per reply, duplicates (same scenario and reply) removed.

    DELIBERATE_RAY_CACHE=/root/.cache/deliberate-ray .venv/bin/python scripts/agentic_replies.py \\
        --out /tmp/agentic_replies.jsonl
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deliberate_ray.engines.select import vllm_cpu_env_vars  # noqa: E402
from deliberate_ray.engines.vllm import cpu_engine_kwargs  # noqa: E402
from deliberate_ray.models import resolve_model  # noqa: E402


def exports() -> dict[str, str]:
    """Trained exports under runs/, named after their arm (and run, when several)."""
    found = sorted(ROOT.glob("runs/*/train/*/export"))
    runs = {p.parents[2].name for p in found}
    return {
        (p.parent.name if len(runs) == 1 else f"{p.parents[2].name}_{p.parent.name}"): str(p)
        for p in found
        if (p / "config.json").exists()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default=str(ROOT / "data" / "eval" / "agentic.jsonl"))
    p.add_argument("--model", action="append", default=[], help="NAME=PATH; default: runs/")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-greedy", action="store_true", help="only the sampled replies")
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=Path("/tmp/agentic_replies.jsonl"))
    a = p.parse_args()
    if os.environ.get("_AGENTIC_REPLIES_ENV") != "1":  # LD_PRELOAD acts at process start only
        env = os.environ | vllm_cpu_env_vars() | {"_AGENTIC_REPLIES_ENV": "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    from vllm import LLM, SamplingParams

    rows = [json.loads(line) for line in Path(a.suite).open() if line.strip()]
    models = {"base": resolve_model("embedded:smollm2-135m-instruct")}
    models |= dict(m.split("=", 1) for m in a.model) if a.model else exports()
    settings = {
        "greedy-rep1.1": SamplingParams(
            max_tokens=a.max_tokens, temperature=0.0, repetition_penalty=1.1
        ),
        f"t{a.temperature:g}": SamplingParams(
            max_tokens=a.max_tokens, temperature=a.temperature, n=a.samples, seed=a.seed
        ),
    }
    if a.no_greedy:
        del settings["greedy-rep1.1"]
    out, seen = [], set()
    for name, path in models.items():
        llm = LLM(str(path), **cpu_engine_kwargs("auto", a.kv_cache_gib, {}))
        for setting, params in settings.items():
            t0 = time.perf_counter()
            outs = llm.chat([r["messages"] for r in rows], params, use_tqdm=False)
            print(f"{name} {setting}: {time.perf_counter() - t0:.0f} s", flush=True)
            for r, o in zip(rows, outs, strict=True):
                for c in o.outputs:
                    key = (r["id"], c.text.strip())
                    if key in seen:
                        continue
                    seen.add(key)
                    digest = hashlib.sha256(f"{r['id']}\n{c.text}".encode()).hexdigest()[:10]
                    out.append(
                        {
                            "id": f"agr-{digest}",
                            "scenario": r["id"],
                            "model": name,
                            "setting": setting,
                            "finish_reason": c.finish_reason,
                            "harm_type": (r.get("harm") or {}).get("type"),
                            "expected": r["expected"],
                            "reply": c.text,
                        }
                    )
        del llm
        gc.collect()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"wrote {len(out)} replies from {list(models)} to {a.out}")


if __name__ == "__main__":
    main()
