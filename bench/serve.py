"""Latency and throughput of the Serve endpoint against the same engine called in process.

In one run, on the same machine and model: p50/p99 latency and requests/s at concurrency 1
and 8. In process, concurrency 8 means one `generate` call on 8 requests (the batch Serve
forms under 8 concurrent clients, with zero serving overhead); over Serve it means 8 client
threads in a closed loop, each sending one request at a time over HTTP.

    .venv/bin/python bench/serve.py                  # tiny model, ~1 minute
    .venv/bin/python bench/serve.py --model embedded:smollm2-135m-instruct --requests 32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import time
from collections.abc import Callable

import httpx

from deliberate_ray.config import ServeConfig
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


def summary(name: str, latencies: list[float], wall: float, n: int) -> dict[str, object]:
    return {
        "path": name,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "req_s": n / wall,
        "n": n,
    }


def request(i: int, max_tokens: int) -> GenRequest:
    messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    return GenRequest(messages=messages, max_tokens=max_tokens, temperature=0.0, top_p=1.0)


def in_process(engine: HFGenerator, n: int, concurrency: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    start = time.perf_counter()
    for first in range(0, n, concurrency):
        batch = [request(i, max_tokens) for i in range(first, min(n, first + concurrency))]
        t = time.perf_counter()
        engine.generate(batch)
        latencies += [time.perf_counter() - t] * len(batch)
    return summary(f"in-process c={concurrency}", latencies, time.perf_counter() - start, n)


def over_http(url: str, n: int, concurrency: int, max_tokens: int) -> dict:
    clients = [httpx.Client(timeout=120) for _ in range(concurrency)]

    def worker(k: int) -> list[float]:
        out = []
        for i in range(k, n, concurrency):
            req = request(i, max_tokens)
            body = {"model": "m", "messages": req.messages, "max_tokens": max_tokens,
                    "temperature": 0.0}  # fmt: skip
            t = time.perf_counter()
            r = clients[k].post(f"{url}/chat/completions", json=body)
            out.append(time.perf_counter() - t)
            r.raise_for_status()
        return out

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        latencies = [x for part in pool.map(worker, range(concurrency)) for x in part]
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    return summary(f"serve c={concurrency}", latencies, wall, n)


def warm(run: Callable[[], object], times: int = 2) -> None:
    for _ in range(times):
        run()


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
    cfg = ServeConfig(
        port=port,
        num_cpus=1,
        torch_threads=args.threads,
        max_batch_size=8,
        batch_wait_timeout_s=args.batch_wait,
    )
    url = start_serve({"m": args.model}, cfg)
    engine = HFGenerator(args.model, device="cpu", torch_threads=args.threads)
    rows = []
    try:
        for c in (1, 8):
            warm(lambda c=c: over_http(url, 2 * c, c, args.max_tokens))
            rows.append(over_http(url, args.requests, c, args.max_tokens))
            warm(lambda c=c: in_process(engine, 2 * c, c, args.max_tokens))
            rows.append(in_process(engine, args.requests, c, args.max_tokens))
    finally:
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
