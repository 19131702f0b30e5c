"""vLLM on CPU, side by side in one run: engine start, the ray.data.llm pipeline against
offline `vllm.LLM`, vLLM against the transformers (hf) engine per dtype, and Serve on vLLM
against the offline async engine.

Parts (`--parts`, default all):
  1 start     seconds until `vllm.LLM(...)` is ready, per dtype, each in a fresh subprocess
              (interpreter start and `import vllm` included; the import and the engine
              construction are also timed apart inside the process)
  2 pipeline  the same N spec-prefixed teacher requests (temperature 0.7, per-row seeds)
              through `apply_engine(kind="vllm")` (ray.data.llm) and through `vllm.LLM` in a
              subprocess: generated tokens/s end to end (engine start included) both ways,
              and generation only for `vllm.LLM`. Target: pipeline >= 0.90 of offline.
  3 hf        generated tokens/s of vLLM (`LLM.generate`) and of `HFGenerator.generate`, one
              batch of greedy spec-prefixed requests each, per dtype (bfloat16, float32);
              model load and engine start excluded, both warmed up on a short request
  4 serve     `start_serve(engine="vllm")` over HTTP against `AsyncLLM` in a subprocess, on
              the same greedy requests: p50 latency one request at a time (target: Serve
              adds <= 10 ms) and generated tokens/s with 8 concurrent clients (target: >= 0.80
              of offline)

Every offline engine runs in a subprocess of this script (`--worker`), started with vLLM's
CPU environment (`vllm_cpu_env_vars()`, LD_PRELOAD included) and the project's CPU engine
kwargs (`engine_kwargs(EngineConfig)`), as the pipeline's and Serve's engines get them. Both
sides of a comparison apply the chat template with the tokenizer the same way (the trailing
assistant prefill "Reasoning:" continued), and the generated and prompt token counts of both
are compared. The paths of a comparison alternate in rounds (`--repeats` for parts 1-3;
part 4 alternates request blocks), as the machine is shared; the load average is recorded
before and after each part and each run. Ray runs its workers, and so the pipeline's and
Serve's engines, at niceness 15: the offline engine compared with them gets the same (parts
2 and 4), while part 3's hf engine (in this process) and its vLLM engine both run at
niceness 0. Writes JSON (`--out`) and prints a table.

    .venv/bin/python bench/vllm_engines.py --quick   # smoke sizes: 13-20 min at load 10-30
    .venv/bin/python bench/vllm_engines.py           # full: ~15-25 min on 2 idle cores

Executors: `ray.serve.llm` forces vLLM's `mp` executor on CPU (the model in a worker process
of its own, behind the engine core); ray.data.llm and offline `AsyncLLM` / `LLM` use the
default (`uni`: the model inside the engine core). `--offline-serve-executor mp` gives the
offline side of part 4 Serve's layout, to tell Serve's own overhead from the executor's.
"""

from __future__ import annotations

# Only the standard library at module level: the `--worker` subprocesses import this file,
# and their start-up time (until the vLLM engine is ready) is one of the measurements.
import argparse
import asyncio
import gc
import importlib.metadata
import json
import math
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs/default.yaml"
PROMPTS = ROOT / "data/prompts/seed.jsonl"
DTYPES = ("bfloat16", "float32")
TARGETS = {
    "pipeline_over_offline": 0.90,  # >= ; tokens/s end to end
    "serve_added_p50_ms": 10.0,  # <= ; c=1
    "serve_over_offline_c8": 0.80,  # >= ; generated tokens/s at 8 concurrent clients
}
# Two paths did the same work when their generated token totals are this close.
SAME_WORK_TOLERANCE = 0.10


# --------------------------------------------------------------------------- worker side


def encode(tok: Any, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """The prompt as ray.data.llm's chat-template and tokenize stages build it: generation
    prompt after a user turn, else the trailing assistant message continued."""
    add = messages[-1]["role"] == "user"
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add, continue_final_message=not add
    )
    return {"prompt_token_ids": tok(text)["input_ids"]}


def worker_main(mode: str, config: dict[str, Any], fd: int) -> None:
    """An offline engine: `llm` (vllm.LLM, one generate call per command) or `async` (AsyncLLM,
    a block of requests under a semaphore per command). Commands arrive as JSON lines on
    stdin; replies leave as JSON lines on `fd` (vLLM logs to stdout/stderr)."""
    os.nice(config["nice"])  # before `import vllm`: the start-up runs at it too
    chan = os.fdopen(fd, "w", buffering=1)

    def send(msg: dict[str, Any]) -> None:
        chan.write(json.dumps(msg) + "\n")

    try:
        if mode == "llm":
            llm_worker(config, send)
        else:
            asyncio.run(async_worker(config, send))
    except BaseException:
        send({"error": traceback.format_exc()[-4000:]})
        raise
    finally:
        chan.flush()
    os._exit(0)  # skip interpreter teardown: vLLM's atexit hooks can take long


def ready_message(t0: float, imported: float, ready: float) -> dict[str, Any]:
    return {"ready_at": ready, "import_s": imported - t0, "engine_s": ready - imported}


def llm_worker(config: dict[str, Any], send: Any) -> None:
    t0 = time.time()
    import vllm

    imported = time.time()
    llm = vllm.LLM(model=config["model"], **config["kwargs"])
    ready = time.time()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(config["model"])
    send(ready_message(t0, imported, ready))
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            send({"ok": True})
            return
        t = time.perf_counter()
        prompts = [encode(tok, r["messages"]) for r in cmd["rows"]]
        params = [vllm.SamplingParams(**r["sampling_params"]) for r in cmd["rows"]]
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t
        send({"generate_s": seconds, "rows": [output_row(o) for o in outs]})


def output_row(out: Any) -> dict[str, Any]:
    gen = out.outputs[0]
    return {
        "num_input_tokens": len(out.prompt_token_ids),
        "num_generated_tokens": len(gen.token_ids),
        "finish_reason": gen.finish_reason,
        "generated_text": gen.text,
    }


async def async_worker(config: dict[str, Any], send: Any) -> None:
    t0 = time.time()
    import vllm
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    imported = time.time()
    args = AsyncEngineArgs(model=config["model"], disable_log_stats=True, **config["kwargs"])
    engine = AsyncLLM.from_engine_args(args)
    ready = time.time()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(config["model"])
    send(ready_message(t0, imported, ready))

    async def one(row: dict[str, Any], sem: asyncio.Semaphore) -> dict[str, Any]:
        async with sem:
            t = time.perf_counter()
            prompt = encode(tok, row["messages"])
            params = vllm.SamplingParams(
                **row["sampling_params"], output_kind=RequestOutputKind.FINAL_ONLY
            )
            final = None
            async for out in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
                final = out
            assert final is not None
            return {
                "latency_s": time.perf_counter() - t,
                "prompt_tokens": len(prompt["prompt_token_ids"]),
                "completion_tokens": len(final.outputs[0].token_ids),
            }

    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            if cmd["op"] == "exit":
                send({"ok": True})
                return
            sem = asyncio.Semaphore(cmd["concurrency"])
            t = time.perf_counter()
            results = await asyncio.gather(*(one(r, sem) for r in cmd["rows"]))
            send({"busy_s": time.perf_counter() - t, "requests": results})
    finally:
        engine.shutdown()


# --------------------------------------------------------------------------- driver side


def ray_niceness() -> int:
    """The niceness Ray's raylet gives its workers (engine actors, Serve replicas), and with
    them the vLLM processes they start; this script's own processes run at niceness 0."""
    return int(os.environ.get("RAY_worker_niceness", "15"))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Worker:
    """One offline vLLM engine in a fresh subprocess of this script, started with vLLM's CPU
    environment (LD_PRELOAD only acts at process start). `start` holds its start-up times."""

    def __init__(
        self, mode: str, model_path: str, kwargs: dict[str, Any], log_dir: Path, nice: int = 0
    ):
        from deliberate_ray.engines.select import vllm_cpu_env_vars

        self.log_path = log_dir / f"{mode}-{kwargs['dtype']}-{uuid.uuid4().hex[:6]}.log"
        config = json.dumps({"model": model_path, "kwargs": kwargs, "nice": nice})
        r, w = os.pipe()
        load_before = load()
        self.spawned = time.time()
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    mode,
                    "--worker-config",
                    config,
                    "--result-fd",
                    str(w),
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ | vllm_cpu_env_vars(),
                pass_fds=(w,),
                start_new_session=True,  # its own process group: the engine core goes with it
                text=True,
                cwd=ROOT,
            )
        os.close(w)
        self.replies = os.fdopen(r)
        try:
            ready = self.recv()
        except BaseException:
            self.kill()
            raise
        self.start = {
            "mode": mode,
            "dtype": kwargs["dtype"],
            "nice": nice,
            "ready_s": ready["ready_at"] - self.spawned,
            "import_s": ready["import_s"],
            "engine_s": ready["engine_s"],
            "load_before": load_before,
        }

    def recv(self) -> dict[str, Any]:
        line = self.replies.readline()
        if not line:
            code = self.proc.wait()
            tail = "\n".join(self.log_path.read_text().splitlines()[-30:])
            raise RuntimeError(f"vLLM worker exited ({code}); log {self.log_path}:\n{tail}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"vLLM worker failed (log {self.log_path}):\n{msg['error']}")
        return msg

    def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("exit")
                self.proc.wait(timeout=60)
        except Exception:
            pass
        self.kill()

    def kill(self) -> None:
        """End the worker's own process group (it and the engine core it spawned)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.replies.close()


def teacher_rows(n: int, max_tokens: int, temperature: float, seed: int) -> list[dict[str, Any]]:
    """The first n seed prompts as teacher requests: spec (values variant) + worked examples
    in context, assistant turn prefilled with "Reasoning:" (~1,350 prompt tokens each)."""
    from deliberate_ray.config import SamplingConfig, TeacherConfig
    from deliberate_ray.engines.rows import sampling_params
    from deliberate_ray.generate.teacher import teacher_messages
    from deliberate_ray.spec import load_spec

    spec = load_spec(SPEC)
    records = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    if n > len(records):
        raise SystemExit(f"{PROMPTS} has {len(records)} prompts; asked for {n}")
    greedy = temperature == 0
    sampling = SamplingConfig(
        max_tokens=max_tokens, temperature=temperature, top_p=1.0 if greedy else 0.95
    )
    rows = []
    for i, rec in enumerate(records[:n]):
        prompt = [{"role": "user", "content": rec["prompt"]}]
        messages = teacher_messages(prompt, spec, rec["category"], "values", TeacherConfig())
        params = sampling_params(sampling, seed=None if greedy else seed + i)
        rows.append({"id": i, "messages": messages, "sampling_params": params})
    return rows


WARMUP_ROW = {
    "messages": [{"role": "user", "content": "Say hi."}],
    "sampling_params": {
        "max_tokens": 2,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": [],
        "seed": None,
    },
}


def totals(rows: list[dict[str, Any]], gen: str, prompt: str) -> dict[str, int]:
    return {
        "generated_tokens": sum(r[gen] for r in rows),
        "prompt_tokens": sum(r[prompt] for r in rows),
    }


def same_work(a: dict[str, int], b: dict[str, int]) -> dict[str, Any]:
    """Whether two paths did comparable work: generated totals within the tolerance."""
    ga, gb = a["generated_tokens"], b["generated_tokens"]
    diff = abs(ga - gb) / max(ga, gb, 1)
    return {
        "generated_tokens": [ga, gb],
        "prompt_tokens": [a["prompt_tokens"], b["prompt_tokens"]],
        "generated_rel_diff": diff,
        "same_prompt_tokens": a["prompt_tokens"] == b["prompt_tokens"],
        "comparable": diff <= SAME_WORK_TOLERANCE,
    }


class Bench:
    def __init__(self, args: argparse.Namespace):
        from deliberate_ray.config import EngineConfig
        from deliberate_ray.engines.vllm import engine_kwargs
        from deliberate_ray.models import resolve_model

        self.args = args
        self.model_path = resolve_model(args.model)
        self.engine = EngineConfig(
            kind="vllm", model=args.model, batch_size=args.batch_size, num_cpus=1
        )
        self.kwargs = engine_kwargs(self.engine)  # dtype: the CPU's (bf16 where native)
        self.log_dir = Path(tempfile.mkdtemp(prefix="vllm_engines-"))
        self.starts: list[dict[str, Any]] = []  # every worker start, in any part

    def worker(
        self, mode: str, dtype: str | None = None, part: str = "", nice: int = 0, **extra: Any
    ) -> Worker:
        """An offline engine. `nice`: against a Ray path, Ray's worker niceness, so that on a
        shared machine both sides compete alike with other processes."""
        kwargs = self.kwargs | ({"dtype": dtype} if dtype else {}) | extra
        w = Worker(mode, self.model_path, kwargs, self.log_dir, nice)
        self.starts.append(w.start | {"part": part})
        return w

    # ------------------------------------------------------------------ 1: engine start

    def part_start(self) -> dict[str, Any]:
        runs = []
        for r in range(self.args.repeats):
            for dtype in DTYPES if r % 2 == 0 else DTYPES[::-1]:
                w = self.worker("llm", dtype, part="start")
                w.close()
                runs.append(w.start)
                print(f"  start LLM {dtype}: {w.start['ready_s']:.1f} s", flush=True)
        summary = {}
        for dtype in DTYPES:
            mine = [x for x in runs if x["dtype"] == dtype]
            summary[f"LLM {dtype}"] = {
                k: statistics.median(x[k] for x in mine)
                for k in ("ready_s", "import_s", "engine_s")
            } | {"n": len(mine), "min_ready_s": min(x["ready_s"] for x in mine)}
        return {"runs": runs, "summary": summary}

    # ------------------------------------------------------------------ 2: pipeline

    def run_offline(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        w = self.worker("llm", part="pipeline", nice=ray_niceness())
        try:
            out = w.call("generate", rows=rows)
            wall = time.time() - w.spawned
        finally:
            w.close()
        t = totals(out["rows"], "num_generated_tokens", "num_input_tokens")
        return t | {
            "wall_s": wall,
            "start_s": w.start["ready_s"],
            "generate_s": out["generate_s"],
            "texts": [r["generated_text"] for r in out["rows"]],
        }

    def run_pipeline(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import ray

        from deliberate_ray.engines import apply_engine

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            t0 = time.perf_counter()
            ds = apply_engine(ray.data.from_items(rows), self.engine, keep=["id"])
            out: list[dict[str, Any]] = []
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                out += batch.to_pylist()
            wall = time.perf_counter() - t0
        finally:
            ray.shutdown()
        errors = [r["engine_error"] for r in out if r["engine_error"]]
        if errors:
            raise RuntimeError(f"{len(errors)}/{len(out)} pipeline rows failed: {errors[0]}")
        out.sort(key=lambda r: r["id"])
        t = totals(out, "num_generated_tokens", "num_input_tokens")
        return t | {"wall_s": wall, "texts": [r["generated_text"] for r in out]}

    def part_pipeline(self) -> dict[str, Any]:
        a = self.args
        rows = teacher_rows(a.requests, a.max_tokens, a.temperature, a.seed)
        runs = []
        for r in range(a.repeats):
            run: dict[str, Any] = {}
            for name in ("offline", "pipeline") if r % 2 == 0 else ("pipeline", "offline"):
                before = load()
                res = self.run_offline(rows) if name == "offline" else self.run_pipeline(rows)
                run[name] = res | {"load_before": before, "load_after": load()}
                print(f"  {name}: {res['generated_tokens']} tokens in {res['wall_s']:.1f} s")
            texts = zip(run["offline"].pop("texts"), run["pipeline"].pop("texts"), strict=True)
            run["identical_texts"] = sum(x == y for x, y in texts)
            runs.append(run)
        keys = ("generated_tokens", "prompt_tokens", "wall_s")
        off = {k: sum(r["offline"][k] for r in runs) for k in (*keys, "generate_s")}
        pipe = {k: sum(r["pipeline"][k] for r in runs) for k in keys}
        off_tps = off["generated_tokens"] / off["wall_s"]
        off_gen_tps = off["generated_tokens"] / off["generate_s"]
        pipe_tps = pipe["generated_tokens"] / pipe["wall_s"]
        check = same_work(off, pipe)
        ratio = pipe_tps / off_tps
        return {
            "requests": len(rows),
            "runs": runs,
            "offline": off | {"tokens_per_s_e2e": off_tps, "tokens_per_s_generate": off_gen_tps},
            "pipeline": pipe | {"tokens_per_s_e2e": pipe_tps},
            "same_work": check,
            "ratio_e2e": ratio,
            "ratio_vs_offline_generate_only": pipe_tps / off_gen_tps,
            "target": {"ratio_e2e": f">= {TARGETS['pipeline_over_offline']}"},
            "pass": ratio >= TARGETS["pipeline_over_offline"] and check["comparable"],
        }

    # ------------------------------------------------------------------ 3: vLLM vs hf

    def run_hf(self, rows: list[dict[str, Any]], dtype: str) -> dict[str, Any]:
        from deliberate_ray.engines.hf import HFGenerator, request_from_row

        t0 = time.perf_counter()
        gen = HFGenerator(
            self.args.model, device="cpu", dtype=dtype, torch_threads=self.args.threads
        )
        load_s = time.perf_counter() - t0
        gen.generate([request_from_row(WARMUP_ROW)])
        t = time.perf_counter()
        out = gen.generate([request_from_row(r) for r in rows])
        seconds = time.perf_counter() - t
        del gen
        gc.collect()
        res = [vars(o) for o in out]
        return totals(res, "num_generated_tokens", "num_input_tokens") | {
            "generate_s": seconds,
            "load_s": load_s,
        }

    def run_vllm(self, rows: list[dict[str, Any]], dtype: str) -> dict[str, Any]:
        w = self.worker("llm", dtype, part="hf")
        try:
            w.call("generate", rows=[WARMUP_ROW])
            out = w.call("generate", rows=rows)
        finally:
            w.close()
        return totals(out["rows"], "num_generated_tokens", "num_input_tokens") | {
            "generate_s": out["generate_s"],
            "start_s": w.start["ready_s"],
        }

    def part_hf(self) -> dict[str, Any]:
        a = self.args
        rows = teacher_rows(a.hf_requests, a.hf_max_tokens, 0.0, a.seed)
        dtypes = [d for d in DTYPES if d not in a.skip_hf_dtype]
        runs = []
        k = 0
        for _ in range(a.repeats):
            for dtype in dtypes:
                run: dict[str, Any] = {"dtype": dtype}
                for name in ("hf", "vllm") if k % 2 == 0 else ("vllm", "hf"):
                    before = load()
                    res = self.run_hf(rows, dtype) if name == "hf" else self.run_vllm(rows, dtype)
                    tps = res["generated_tokens"] / res["generate_s"]
                    run[name] = res | {
                        "tokens_per_s": tps,
                        "load_before": before,
                        "load_after": load(),
                    }
                    print(f"  {name} {dtype}: {res['generated_tokens']} tokens, {tps:.1f} tok/s")
                runs.append(run)
                k += 1
        per_dtype = {}
        for dtype in dtypes:
            mine = [r for r in runs if r["dtype"] == dtype]
            sums = {
                name: {
                    key: sum(r[name][key] for r in mine)
                    for key in ("generated_tokens", "prompt_tokens", "generate_s")
                }
                for name in ("hf", "vllm")
            }
            for s in sums.values():
                s["tokens_per_s"] = s["generated_tokens"] / s["generate_s"]
            per_dtype[dtype] = sums | {
                "ratio_vllm_over_hf": sums["vllm"]["tokens_per_s"] / sums["hf"]["tokens_per_s"],
                "same_work": same_work(sums["hf"], sums["vllm"]),
            }
        return {"requests": len(rows), "runs": runs, "per_dtype": per_dtype}

    # ------------------------------------------------------------------ 4: Serve

    def part_serve(self) -> dict[str, Any]:
        import httpx
        import ray

        from deliberate_ray.config import DEFAULT_KEY_ENV, ServeConfig
        from deliberate_ray.serve import shutdown, start_serve

        a = self.args
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        loop = asyncio.new_event_loop()
        var = DEFAULT_KEY_ENV
        os.environ.setdefault(var, secrets.token_urlsafe(32))  # serving fails closed
        client = httpx.AsyncClient(
            timeout=600,
            limits=httpx.Limits(max_connections=16),
            headers={"Authorization": f"Bearer {os.environ[var]}"},
        )
        worker = None
        served = False
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cfg = ServeConfig(engine="vllm", port=port, num_cpus=1)
            t0 = time.perf_counter()
            url = start_serve({"base": a.model}, cfg)
            served = True
            serve_start = time.perf_counter() - t0
            print(f"  Serve up in {serve_start:.1f} s at {url}", flush=True)
            executor = a.offline_serve_executor
            extra = {} if executor == "default" else {"distributed_executor_backend": executor}
            worker = self.worker("async", part="serve", nice=ray_niceness(), **extra)

            async def one(row: dict[str, Any], sem: asyncio.Semaphore) -> dict[str, Any]:
                sp = {k: v for k, v in row["sampling_params"].items() if v not in (None, [])}
                body = {"model": "base", "messages": row["messages"], **sp}
                if row["messages"][-1]["role"] == "assistant":
                    body |= {"continue_final_message": True, "add_generation_prompt": False}
                async with sem:
                    t = time.perf_counter()
                    resp = await client.post(f"{url}/chat/completions", json=body)
                    lat = time.perf_counter() - t
                resp.raise_for_status()
                usage = resp.json()["usage"]
                return {
                    "latency_s": lat,
                    "prompt_tokens": usage["prompt_tokens"],
                    "completion_tokens": usage["completion_tokens"],
                }

            async def serve_block(rows: list[dict[str, Any]], c: int) -> dict[str, Any]:
                sem = asyncio.Semaphore(c)
                t = time.perf_counter()
                results = await asyncio.gather(*(one(r, sem) for r in rows))
                return {"busy_s": time.perf_counter() - t, "requests": results}

            results = {}
            for c, n, max_tokens in (
                (1, a.latency_requests, a.latency_max_tokens),
                (8, a.throughput_requests, a.max_tokens),
            ):
                rows = teacher_rows(a.requests, max_tokens, 0.0, a.seed)
                block = 2 * c
                rounds = math.ceil(n / block)
                got: dict[str, list[dict[str, Any]]] = {"serve": [], "offline": []}
                busy = {"serve": 0.0, "offline": 0.0}
                before = load()
                for r in range(-1, rounds):  # one warm-up round
                    chunk = [rows[(max(r, 0) * block + k) % len(rows)] for k in range(block)]
                    for name in ("serve", "offline") if r % 2 else ("offline", "serve"):
                        if name == "serve":
                            res = loop.run_until_complete(serve_block(chunk, c))
                        else:
                            res = worker.call("block", rows=chunk, concurrency=c)
                        if r >= 0:
                            got[name] += res["requests"]
                            busy[name] += res["busy_s"]
                results[f"c{c}"] = self.serve_summary(got, busy, c, max_tokens) | {
                    "load_before": before,
                    "load_after": load(),
                }
                print(
                    f"  c={c}: "
                    + ", ".join(
                        f"{k} p50 {v['p50_ms']:.0f} ms {v['tokens_per_s']:.1f} tok/s"
                        for k, v in results[f"c{c}"].items()
                        if k in ("serve", "offline")
                    ),
                    flush=True,
                )
        finally:
            if worker is not None:
                worker.close()
            loop.run_until_complete(client.aclose())
            loop.close()
            if served:
                shutdown()
            ray.shutdown()
        c1, c8 = results["c1"], results["c8"]
        added = c1["serve"]["p50_ms"] - c1["offline"]["p50_ms"]
        ratio = c8["serve"]["tokens_per_s"] / c8["offline"]["tokens_per_s"]
        return {
            "serve_start_s": serve_start,
            "offline_async_start_s": worker.start["ready_s"],
            "executors": {
                "serve": "mp (ray.serve.llm sets it on CPU)",
                "offline": a.offline_serve_executor,
            },
            "c1": c1,
            "c8": c8,
            "added_p50_ms_c1": added,
            "ratio_tokens_per_s_c8": ratio,
            "target": {
                "added_p50_ms_c1": f"<= {TARGETS['serve_added_p50_ms']}",
                "ratio_tokens_per_s_c8": f">= {TARGETS['serve_over_offline_c8']}",
            },
            "pass_latency": added <= TARGETS["serve_added_p50_ms"]
            and c1["same_work"]["comparable"],
            "pass_throughput": ratio >= TARGETS["serve_over_offline_c8"]
            and c8["same_work"]["comparable"],
        }

    @staticmethod
    def serve_summary(
        got: dict[str, list[dict[str, Any]]], busy: dict[str, float], c: int, max_tokens: int
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"concurrency": c, "max_tokens": max_tokens}
        for name, reqs in got.items():
            lat = sorted(r["latency_s"] for r in reqs)
            gen = sum(r["completion_tokens"] for r in reqs)
            out[name] = {
                "n": len(reqs),
                "p50_ms": 1000 * statistics.median(lat),
                "p90_ms": 1000 * lat[min(len(lat) - 1, round(0.9 * (len(lat) - 1)))],
                "mean_ms": 1000 * statistics.fmean(lat),
                "busy_s": busy[name],
                "req_per_s": len(reqs) / busy[name],
                "tokens_per_s": gen / busy[name],
                "generated_tokens": gen,
                "prompt_tokens": sum(r["prompt_tokens"] for r in reqs),
            }
        out["same_work"] = same_work(out["offline"], out["serve"])
        return out


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    from deliberate_ray.engines.select import cpu_flags

    flags = cpu_flags()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "nproc": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "amx_tile": "amx_tile" in flags,
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("vllm-cpu", "vllm", "torch", "ray", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def tokens(sw: dict[str, Any]) -> str:
    """Generated tokens of both paths (prompt tokens in brackets)."""
    g, p = sw["generated_tokens"], sw["prompt_tokens"]
    return f"{g[0]}/{g[1]} ({p[0]}/{p[1]})"


def table(result: dict[str, Any]) -> list[str]:
    parts = result["parts"]
    ok = {True: "pass", False: "FAIL"}
    rows = [("part", "measure", "value", "target", "result")]

    def add(part: str, measure: str, value: str, target: str = "", passed: bool | None = None):
        rows.append((part, measure, value, target, "" if passed is None else ok[passed]))

    for name, s in parts.get("start", {}).get("summary", {}).items():
        value = f"{s['ready_s']:.1f} ({s['import_s']:.1f} + {s['engine_s']:.1f})"
        add("1 start", f"{name}: ready s (import + engine)", value)
    for s in result.get("starts", []):
        if s["part"] != "start":
            add(
                "1 start",
                f"{s['mode']} {s['dtype']}, part {s['part']}: ready s",
                f"{s['ready_s']:.1f}",
            )
    if "serve_start_s" in (p := parts.get("serve", {})):
        add("1 start", "Serve app (start_serve): ready s", f"{p['serve_start_s']:.1f}")
    if "ratio_e2e" in (p := parts.get("pipeline", {})):
        off, sw = p["offline"], p["same_work"]
        e2e, gen = off["tokens_per_s_e2e"], off["tokens_per_s_generate"]
        add("2 pipeline", "offline LLM tok/s e2e (generate only)", f"{e2e:.1f} ({gen:.1f})")
        add("2 pipeline", "ray.data.llm tok/s e2e", f"{p['pipeline']['tokens_per_s_e2e']:.1f}")
        add(
            "2 pipeline",
            "tokens offline/pipeline (prompt)",
            tokens(sw),
            "within 10%",
            sw["comparable"],
        )
        target = f">= {TARGETS['pipeline_over_offline']}"
        add("2 pipeline", "pipeline / offline, e2e", f"{p['ratio_e2e']:.3f}", target, p["pass"])
    for dtype, d in parts.get("hf", {}).get("per_dtype", {}).items():
        v, h = d["vllm"]["tokens_per_s"], d["hf"]["tokens_per_s"]
        add(
            "3 hf",
            f"{dtype}: vLLM / hf tok/s",
            f"{v:.1f} / {h:.1f} = {d['ratio_vllm_over_hf']:.2f}x",
        )
        add("3 hf", f"{dtype}: tokens hf/vLLM (prompt)", tokens(d["same_work"]))
    if "c1" in (p := parts.get("serve", {})):
        c1, c8 = p["c1"], p["c8"]
        s, o = c1["serve"]["p50_ms"], c1["offline"]["p50_ms"]
        value = f"{s:.1f} / {o:.1f} ({p['added_p50_ms_c1']:+.1f})"
        target = f"<= +{TARGETS['serve_added_p50_ms']:g} ms"
        add("4 serve", "c=1 p50 ms serve / offline", value, target, p["pass_latency"])
        s, o = c8["serve"]["tokens_per_s"], c8["offline"]["tokens_per_s"]
        value = f"{s:.1f} / {o:.1f} = {p['ratio_tokens_per_s_c8']:.3f}"
        target = f">= {TARGETS['serve_over_offline_c8']}"
        add("4 serve", "c=8 tok/s serve / offline", value, target, p["pass_throughput"])
        for c in (c1, c8):
            sw = c["same_work"]
            measure = f"c={c['concurrency']} tokens offline/serve (prompt)"
            add("4 serve", measure, tokens(sw), "within 10%", sw["comparable"])
    for name, p in parts.items():
        if "error" in p:
            add(name, "ERROR", p["error"].strip().splitlines()[-1][:100])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--parts", default="start,pipeline,hf,serve")
    p.add_argument("--quick", action="store_true", help="smoke sizes (overrides the sizes)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of parts 1-3, paths alternate")
    p.add_argument("--requests", type=int, default=32, help="part 2 (and 4's distinct prompts)")
    p.add_argument("--max-tokens", type=int, default=128, help="parts 2 and 4 (c=8)")
    p.add_argument("--temperature", type=float, default=0.7, help="part 2, per-row seeds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="ray.data.llm batch size")
    p.add_argument("--hf-requests", type=int, default=16)
    p.add_argument("--hf-max-tokens", type=int, default=64)
    p.add_argument("--skip-hf-dtype", action="append", default=[], choices=DTYPES)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the hf engine")
    p.add_argument("--latency-requests", type=int, default=64, help="part 4 c=1, per path")
    p.add_argument("--latency-max-tokens", type=int, default=16, help="part 4 c=1")
    p.add_argument("--throughput-requests", type=int, default=48, help="part 4 c=8, per path")
    p.add_argument(
        "--offline-serve-executor",
        default="default",
        choices=("default", "uni", "mp"),
        help="vLLM executor of part 4's offline AsyncLLM (Serve's is mp)",
    )
    p.add_argument("--out", default="bench/results/vllm_engines.json")
    p.add_argument("--worker", choices=("llm", "async"), help=argparse.SUPPRESS)
    p.add_argument("--worker-config", help=argparse.SUPPRESS)
    p.add_argument("--result-fd", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args.worker, json.loads(args.worker_config), args.result_fd)
        return
    if args.quick:
        args.requests, args.max_tokens, args.batch_size = 4, 16, 4
        args.hf_requests, args.hf_max_tokens = 4, 16
        args.latency_requests, args.latency_max_tokens, args.throughput_requests = 4, 8, 16

    from deliberate_ray.engines.select import vllm_cpu_env_vars

    bench = Bench(args)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    runners = {
        "start": bench.part_start,
        "pipeline": bench.part_pipeline,
        "hf": bench.part_hf,
        "serve": bench.part_serve,
    }
    result: dict[str, Any] = {
        "bench": "vllm_engines",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith(("worker", "result"))}
        | {
            "model_path": bench.model_path,
            "engine_config": bench.engine.model_dump(),
            "vllm_engine_kwargs": bench.kwargs,
            "vllm_cpu_env": vllm_cpu_env_vars(),
            "offline_worker_niceness": {
                "start": 0,
                "pipeline": ray_niceness(),
                "hf": 0,
                "serve": ray_niceness(),
            },
            "targets": TARGETS,
            "same_work_tolerance": SAME_WORK_TOLERANCE,
            "worker_logs": str(bench.log_dir),
        },
        "parts": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = False
    for name in parts:
        print(f"part {name} (load {load()})", flush=True)
        before, t0 = load(), time.perf_counter()
        try:
            res = runners[name]()
        except Exception:
            failed = True
            res = {"error": traceback.format_exc()[-6000:]}
            print(res["error"], file=sys.stderr, flush=True)
        res |= {"load_before": before, "load_after": load(), "part_s": time.perf_counter() - t0}
        result["parts"][name] = res
        result["starts"] = bench.starts
        out.write_text(json.dumps(result, indent=2))  # after every part: partial results survive
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["table"] = table(result)
    checks = [
        result["parts"].get("pipeline", {}).get("same_work", {}).get("comparable", True),
        *(
            result["parts"]["serve"][c]["same_work"]["comparable"]
            for c in ("c1", "c8")
            if c in result["parts"].get("serve", {})
        ),
    ]
    out.write_text(json.dumps(result, indent=2))
    m = result["machine"]
    print(
        f"\nmachine: {m['platform']}, {m['nproc']} CPUs, avx512_bf16={m['avx512_bf16']} "
        f"amx_bf16={m['amx_bf16']}; vllm-cpu {result['versions']['vllm-cpu']}, torch "
        f"{result['versions']['torch']}, ray {result['versions']['ray']}; dtype "
        f"{bench.kwargs['dtype']}; load {load()}\n"
    )
    print("\n".join(result["table"]))
    print(f"\n-> {out} (worker logs: {bench.log_dir})")
    if failed or not all(checks):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
