"""Recovery from killed processes: each test SIGKILLs a real process of a running job and
checks that the job ends as if nothing had happened.

- a Ray Train worker mid-run: FailureConfig restarts the worker group, training resumes from
  the latest checkpoint, and each step appears once in metrics.jsonl;
- an engine actor mid-generation (the HTTP engine's Ray Data actor): Ray Data restarts the
  actor and retries its batch; every prompt and sample is committed exactly once;
- a Serve replica mid-eval: Serve starts a new replica, the eval's requests that died with
  the old one are retried (a 500 is retried), and every row is answered once.

The processes are found by the titles Ray gives them (`ray::RayTrainWorker...`,
`ray::MapWorker(...HttpRequestUDF...)`, `ray::ServeReplica:<app>:<deployment>`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq
import pytest
from openai_stub import StubServer
from test_generate import PROMPTS, run_config, stub_reply
from test_train_ray import make_cfg, workdir  # noqa: F401  (fixture)

from deliberate_ray.config import EngineConfig, SamplingConfig, ServeConfig, override
from deliberate_ray.engines import apply_engine
from deliberate_ray.engines.rows import sampling_params
from deliberate_ray.pipeline import run_stage
from deliberate_ray.train import run_train

pytestmark = pytest.mark.ray


def processes(title: str) -> dict[int, psutil.Process]:
    """Live processes whose command line (Ray's process title) contains `title`."""
    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if title in " ".join(p.info["cmdline"] or []) and p.status() != "zombie":
                found[p.info["pid"]] = p
        except psutil.Error:
            continue
    return found


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 240.0) -> Any:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def kill(proc: psutil.Process) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# ------------------------------------------------------------------ Ray Train worker


def test_a_killed_train_worker_restarts_from_its_checkpoint(
    ray_session,
    workdir: Path,  # noqa: F811
    tiny_model: str,
) -> None:
    cfg = make_cfg(
        workdir,
        tiny_model,
        num_workers=1,
        max_steps=None,
        epochs=4,  # ~40 steps (packed rows): long enough to land a kill midway
        checkpoint_every=4,
        keep_checkpoints=1,
        max_failures=1,
    )
    before = set(processes("RayTrainWorker"))
    run_dir = workdir / "run" / "train" / "killed"
    metrics_path = run_dir / "metrics.jsonl"

    def steps_logged() -> int:
        try:
            return len(metrics_path.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def registered() -> int:
        """The step of the latest checkpoint Ray Train's controller has registered (one a
        worker reported but the controller has not polled yet would be lost with it)."""
        try:
            snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return 0
        latest = snapshot.get("latest_checkpoint_result") or {}
        return int((latest.get("metrics") or {}).get("step") or 0)

    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_train, override(cfg.train, "train", name="killed"), cfg.run_dir)
        # Past a registered checkpoint: the worker that wrote it is the one to kill.
        wait_for("a registered checkpoint", lambda: registered() or run.done(), timeout_s=600)
        assert not run.done(), f"the run ended before the kill: {run.exception()}"
        checkpointed = registered()
        workers = {pid: p for pid, p in processes("RayTrainWorker").items() if pid not in before}
        assert len(workers) == 1, workers
        logged_at_kill = steps_logged()
        kill(next(iter(workers.values())))
        summary = run.result(timeout=600)

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    total = rows[-1]["total_steps"]
    assert logged_at_kill < total, "killed too late: the run had finished"
    assert [r["step"] for r in rows] == list(range(1, total + 1))  # each step once
    assert summary.steps == total and summary.export_dir
    # The first attempt started fresh; the restarted one loaded a checkpoint (not step 0),
    # and went on from there: the rows it wrote start right after that checkpoint.
    resumed = sorted({r["resumed_at"] for r in rows})
    assert resumed[0] == 0 and len(resumed) == 2, resumed
    restart = resumed[1]
    assert restart >= checkpointed >= 4 and restart % 4 == 0
    assert [r["step"] for r in rows if r["resumed_at"] == restart][0] == restart + 1
    assert all(r["resumed_at"] == 0 for r in rows if r["step"] <= restart)


# ------------------------------------------------------------------ engine actor


def test_a_killed_engine_actor_loses_and_duplicates_no_row(ray_session, tmp_path: Path) -> None:
    with StubServer(stub_reply) as stub:
        engine = {
            "kind": "http",
            "model": "stub",
            "base_url": stub.base_url,
            "batch_size": 1,
            "concurrency": 1,
            "max_retries": 0,
        }
        cfg = run_config(tmp_path, "killed", engine, engine)
        cfg.generate.shard_prompts = 1
        cfg.generate.judge.llm.enabled = False
        stub.delay_s = 0.3  # slow answers, so the kill lands with batches still to do
        before = set(processes("HttpRequestUDF"))
        commits = tmp_path / "killed" / "_commits"
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(run_stage, cfg, "generate", progress=False)
            wait_for(
                "the first committed shard",
                lambda: (commits.exists() and any(commits.glob("*.json"))) or run.done(),
            )
            assert not run.done(), f"the run ended before the kill: {run.exception()}"
            actors = {pid: p for pid, p in processes("HttpRequestUDF").items() if pid not in before}
            assert actors, "no engine actor found"
            done_at_kill = len(list(commits.glob("*.json")))
            for p in actors.values():
                kill(p)
            result = run.result(timeout=600)
        requests = len(stub.requests)

    assert done_at_kill < len(PROMPTS), "killed too late: every shard was in"
    committed = [i for f in commits.glob("*.json") for i in json.loads(f.read_text())["ids"]]
    assert len(committed) == len(set(committed)) == len(PROMPTS)
    # Each prompt ends exactly once (a tuple, or a select-stage quarantine row), and each of
    # its samples once (judged, or quarantined by the parser).
    tuples = pq.ParquetDataset(result.tuples).read().column("id").to_pylist()
    quarantine = pq.ParquetDataset(result.quarantine).read().to_pylist()
    dropped = [q["id"] for q in quarantine if q["stage"] == "select"]
    assert sorted(tuples + dropped) == sorted(committed)
    samples = pq.ParquetDataset(result.samples).read().to_pylist()
    keys = [(s["id"], s["sample_index"]) for s in samples]
    malformed = [q["id"] for q in quarantine if q["stage"] == "parse"]
    assert len(keys) == len(set(keys)) and len(keys) + len(malformed) == 2 * len(PROMPTS)
    # None of them failed: the killed actor's batch was answered on the retry.
    errors = [q for q in quarantine if q["reason"].startswith("engine_error")]
    assert not errors, errors
    # The killed actor's batch was sent again: more requests than samples.
    assert requests > 2 * len(PROMPTS)


# ------------------------------------------------------------------ Serve replica


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_serve_replica_mid_eval_is_replaced_and_every_request_answered_once(
    ray_session, tiny_model: str
) -> None:
    from deliberate_ray.serve.launch import APP_NAME, shutdown, start_serve

    serve_cfg = ServeConfig(
        engine="hf", no_auth=True, port=free_port(), num_cpus=0.5, max_batch_size=4,
        torch_threads=1,
    )  # fmt: skip
    url = start_serve({"tiny": tiny_model}, serve_cfg)
    title = f"ServeReplica:{APP_NAME}"
    try:
        (old_pid, old) = wait_for("the replica", lambda: next(iter(processes(title).items())))
        engine = EngineConfig(
            kind="http", model="tiny", base_url=url, batch_size=4, concurrency=1,
            max_retries=5, timeout_s=120,
        )  # fmt: skip
        sp = sampling_params(SamplingConfig(max_tokens=128, temperature=0.0))
        rows = [
            {"key": i, "sampling_params": sp,
             "messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]}
            for i in range(48)
        ]  # fmt: skip
        ds = apply_engine(ray_session.data.from_items(rows), engine, keep=["key"])
        got: list[dict[str, Any]] = []
        killed = threading.Event()
        for row in ds.iter_rows():
            got.append(row)
            if not killed.is_set():  # the first reply is in, the next batch in flight
                kill(old)
                killed.set()
                answered_at_kill = len(got)
        new = wait_for("a new replica", lambda: [p for p in processes(title) if p != old_pid])
    finally:
        shutdown()

    assert answered_at_kill < len(rows), "killed too late: every request was answered"
    assert new and old_pid not in new
    assert sorted(r["key"] for r in got) == list(range(len(rows)))  # each row once
    failed = [(r["key"], r["engine_error"]) for r in got if r["engine_error"]]
    assert not failed, failed
    assert all(r["num_generated_tokens"] > 0 for r in got)
