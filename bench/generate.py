"""Generated tokens/s of the Ray Data teacher pipeline vs the same HFGenerator called directly.

Both paths get the same teacher requests (spec in context, n samples per prompt, per-row
seeds), in the same batches, on the same model and threads, in one process run; the check
that both generated the same number of tokens shows they did the same work. The pipeline
time includes starting its actor and loading the model there; the direct time is reported
with and without the model load. Writes JSON next to the printed ratio.

    .venv/bin/python bench/generate.py --prompts 4 --samples 4 --max-tokens 64 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pyarrow as pa

from deliberate_ray.config import Config, EngineConfig, GenerateConfig, PromptsConfig, TeacherConfig
from deliberate_ray.engines import apply_engine
from deliberate_ray.engines.hf import HFGenerator, request_from_row
from deliberate_ray.generate.run import REQUEST, teacher_requests
from deliberate_ray.prompts import load_prompts
from deliberate_ray.spec import load_spec


def requests_table(args: argparse.Namespace, spec_path: str) -> pa.Table:
    import ray

    spec = load_spec(spec_path)
    prompts = load_prompts(PromptsConfig(limit=args.prompts), spec.category_ids).prompts
    table = pa.concat_tables(ray.get(prompts.to_arrow_refs()))
    teacher = TeacherConfig(
        samples_per_prompt=args.samples,
        sampling={"max_tokens": args.max_tokens, "stop": ["\n\n"], "seed": 0},
    )
    cfg = Config(generate=GenerateConfig(teacher=teacher))
    return teacher_requests(table, spec, cfg)


def run_direct(rows: list[dict], args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    gen = HFGenerator(args.model, device="cpu", torch_threads=args.threads)
    t1 = time.perf_counter()
    tokens = 0
    for i in range(0, len(rows), args.batch_size):
        out = gen.generate([request_from_row(r) for r in rows[i : i + args.batch_size]])
        tokens += sum(r.num_generated_tokens for r in out)
    t2 = time.perf_counter()
    return {"tokens": tokens, "load_s": t1 - t0, "generate_s": t2 - t1}


def run_pipeline(table: pa.Table, args: argparse.Namespace) -> dict:
    import ray

    engine = EngineConfig(
        kind="hf",
        model=args.model,
        batch_size=args.batch_size,
        device="cpu",
        num_cpus=1,
        torch_threads=args.threads,
    )
    t0 = time.perf_counter()
    ds = apply_engine(ray.data.from_arrow(table), engine, keep=["id"])
    tokens = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        tokens += sum(batch.column("num_generated_tokens").to_pylist())
    return {"tokens": tokens, "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="direct, pipeline, direct, ...")
    p.add_argument("--out", default="bench/results/generate.json")
    args = p.parse_args()

    import ray

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    table = requests_table(args, "specs/default.yaml")
    assert table.schema == REQUEST
    rows = table.to_pylist()
    # Alternate the two paths so that load from other processes hits both alike.
    runs = [(run_direct(rows, args), run_pipeline(table, args)) for _ in range(args.repeats)]
    ray.shutdown()
    direct = {k: sum(d[k] for d, _ in runs) for k in runs[0][0]}
    pipeline = {k: sum(p[k] for _, p in runs) for k in runs[0][1]}

    direct_tps = direct["tokens"] / direct["generate_s"]
    direct_tps_load = direct["tokens"] / (direct["load_s"] + direct["generate_s"])
    pipeline_tps = pipeline["tokens"] / pipeline["wall_s"]
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.platform()}",
        "settings": vars(args) | {"requests": len(rows)},
        "runs": [{"direct": d, "pipeline": p} for d, p in runs],
        "direct": direct | {"tokens_per_s": direct_tps, "tokens_per_s_incl_load": direct_tps_load},
        "pipeline": pipeline | {"tokens_per_s": pipeline_tps},
        "same_work": direct["tokens"] == pipeline["tokens"],
        "ratio": pipeline_tps / direct_tps,
        "ratio_incl_load": pipeline_tps / direct_tps_load,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"{len(rows)} requests, {direct['tokens']} tokens direct / {pipeline['tokens']} pipeline\n"
        f"direct:   {direct_tps:.1f} tok/s generating ({direct_tps_load:.1f} incl. model load)\n"
        f"pipeline: {pipeline_tps:.1f} tok/s end to end (actor start + model load included)\n"
        f"ratio pipeline/direct: {result['ratio']:.3f} "
        f"(vs direct incl. load: {result['ratio_incl_load']:.3f}) -> {args.out}"
    )


if __name__ == "__main__":
    main()
