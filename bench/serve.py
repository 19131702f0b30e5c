"""Latency and throughput of the Serve endpoint against the same engine called in process.

In one run, on the same machine and model: p50/p99 latency and requests/s at concurrency 1
and 8. A round at concurrency c is c requests at once: in process, one `generate` call on
the c requests (the batch Serve should form, with no serving cost); over Serve, c client
threads each sending one request over HTTP. Rounds of the two paths alternate, so both see
the same background load (the numbers in docs/serve-eval.md came from a shared machine).

    .venv/bin/python bench/serve.py                  # tiny model, ~1 minute
    .venv/bin/python bench/serve.py --model embedded:smollm2-135m-instruct --requests 32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import secrets
import socket
import statistics
import time

import httpx

from deliberate_ray.config import DEFAULT_KEY_ENV, ServeConfig
from deliberate_ray.engines.hf import GenRequest, HFGenerator

PROMPTS = [
    "Give me three tips for a good night's sleep.",
    "How do I kill a stuck process on Linux?",
    "Write a haiku about autumn rain.",
    "What is the capital of Australia?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def request(i: int, max_tokens: int) -> GenRequest:
    messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    return GenRequest(messages=messages, max_tokens=max_tokens, temperature=0.0, top_p=1.0)


class Paths:
    """The two ways to get c answers at once; each returns the per-request latencies."""

    def __init__(self, engine: HFGenerator, url: str, max_tokens: int, concurrency: int):
        self.engine = engine
        self.url = url
        self.max_tokens = max_tokens
        key = os.environ[DEFAULT_KEY_ENV]  # main() sets it
        auth = {"Authorization": f"Bearer {key}"}  # as a user's client sends it
        self.clients = [httpx.Client(timeout=120, headers=auth) for _ in range(concurrency)]
        self.pool = concurrent.futures.ThreadPoolExecutor(concurrency)

    def in_process(self, first: int, c: int) -> list[float]:
        t = time.perf_counter()
        self.engine.generate([request(first + k, self.max_tokens) for k in range(c)])
        return [time.perf_counter() - t] * c

    def serve(self, first: int, c: int) -> list[float]:
        def one(k: int) -> float:
            req = request(first + k, self.max_tokens)
            body = {"model": "m", "messages": req.messages, "max_tokens": self.max_tokens,
                    "temperature": 0.0}  # fmt: skip
            t = time.perf_counter()
            self.clients[k].post(f"{self.url}/chat/completions", json=body).raise_for_status()
            return time.perf_counter() - t

        return list(self.pool.map(one, range(c)))

    def close(self) -> None:
        self.pool.shutdown()
        for client in self.clients:
            client.close()


def measure(paths: Paths, n: int, c: int) -> list[dict[str, object]]:
    latencies: dict[str, list[float]] = {"serve": [], "in-process": []}
    busy = {"serve": 0.0, "in-process": 0.0}
    for r in range(-2, n // c):  # two warm-up rounds
        order = ("serve", "in-process") if r % 2 else ("in-process", "serve")
        for name in order:
            t = time.perf_counter()
            lat = paths.serve(r * c, c) if name == "serve" else paths.in_process(r * c, c)
            if r >= 0:
                busy[name] += time.perf_counter() - t
                latencies[name] += lat
    return [
        {
            "path": f"{name} c={c}",
            "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * percentile(lat, 0.99),
            "req_s": len(lat) / busy[name],
            "n": len(lat),
        }
        for name, lat in latencies.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--requests", type=int, default=96, help="per path and concurrency")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both paths")
    parser.add_argument("--batch-wait", type=float, default=ServeConfig().batch_wait_timeout_s)
    args = parser.parse_args()

    import ray

    from deliberate_ray.serve import shutdown, start_serve

    ray.init(include_dashboard=False, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault(DEFAULT_KEY_ENV, secrets.token_urlsafe(32))  # serving fails closed
    cfg = ServeConfig(
        engine="hf",
        port=port,
        num_cpus=1,
        torch_threads=args.threads,
        max_batch_size=8,
        batch_wait_timeout_s=args.batch_wait,
    )
    url = start_serve({"m": args.model}, cfg)
    engine = HFGenerator(args.model, device="cpu", torch_threads=args.threads)
    paths = Paths(engine, url, args.max_tokens, 8)
    try:
        rows = [row for c in (1, 8) for row in measure(paths, args.requests, c)]
    finally:
        paths.close()
        shutdown()
    print(
        f"machine: {os.cpu_count()}-core CPU, torch threads {args.threads}; model {args.model}; "
        f"{args.max_tokens} new tokens (greedy); {args.requests} requests each; "
        f"batch wait {1000 * args.batch_wait:g} ms"
    )
    print("\n| path | p50 ms | p99 ms | req/s | n |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['path']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['req_s']:.1f} | {r['n']} |"
        )
    for c in (1, 8):
        serve = next(r for r in rows if r["path"] == f"serve c={c}")
        local = next(r for r in rows if r["path"] == f"in-process c={c}")
        print(f"\nServe adds {serve['p50_ms'] - local['p50_ms']:.1f} ms at p50, c={c}")


if __name__ == "__main__":
    main()
