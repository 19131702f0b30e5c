"""Two models behind one Serve app on a small machine: asked at the same time, or one after
the other. The eval's question: should the models answer a suite together or in turn?

Starts the demo's Serve app (`configs/demo.yaml`, serve section, vLLM on CPU) with the base
model and a second model, sends each the in-distribution suite (every prompt in flight at
once, greedy, `--max-tokens`) first to both models together, then to each alone, and
records wall times and generated tokens.

    .venv/bin/python bench/serve_models_at_once.py --model cot=RUN/train/cot/export
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deliberate_ray.config import DEFAULT_KEY_ENV, load_config  # noqa: E402


async def ask(url: str, key: str, model: str, rows: list[dict], max_tokens: int) -> dict:
    import httpx

    async def one(client: httpx.AsyncClient, prompt: str) -> int:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        r = await client.post(url + "/chat/completions", json=body, timeout=1200)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(headers=headers) as client:
        tokens = await asyncio.gather(*(one(client, r["prompt"]) for r in rows))
    return {"wall_s": round(time.perf_counter() - t0, 1), "tokens": sum(tokens)}


async def together(url: str, key: str, models: list[str], rows: list[dict], n: int) -> dict:
    t0 = time.perf_counter()
    parts = await asyncio.gather(*(ask(url, key, m, rows, n) for m in models))
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "tokens": sum(p["tokens"] for p in parts),
        "per_model": dict(zip(models, parts, strict=True)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--model", required=True, help="NAME=PATH of the second model")
    p.add_argument("--suite", default=str(ROOT / "data" / "eval" / "in_distribution.jsonl"))
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "serve_models_at_once.json"
    )
    a = p.parse_args()
    from deliberate_ray.serve import shutdown, start_serve

    name, path = a.model.split("=", 1)
    models = {"base": "embedded:smollm2-135m-instruct", name: path}
    cfg = load_config(a.config).serve
    assert cfg is not None
    key = os.environ.setdefault(cfg.api_key_env or DEFAULT_KEY_ENV, secrets.token_urlsafe(32))
    rows = [json.loads(line) for line in Path(a.suite).open()]
    t0 = time.perf_counter()
    url = start_serve(models, cfg)
    out: dict = {
        "config": a.config,
        "models": models,
        "requests_per_model": len(rows),
        "max_tokens": a.max_tokens,
        "serve_ready_s": round(time.perf_counter() - t0, 1),
        "load_avg_before": os.getloadavg(),
    }
    try:
        out["together"] = asyncio.run(together(url, key, list(models), rows, a.max_tokens))
        print("together", out["together"], flush=True)
        out["in_turn"] = {m: asyncio.run(ask(url, key, m, rows, a.max_tokens)) for m in models}
        print("in turn", out["in_turn"], flush=True)
    finally:
        shutdown()
    out["in_turn_total_s"] = round(sum(v["wall_s"] for v in out["in_turn"].values()), 1)
    out["together_over_in_turn"] = round(out["together"]["wall_s"] / out["in_turn_total_s"], 2)
    out["load_avg_after"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.out, out["together_over_in_turn"])


if __name__ == "__main__":
    main()
