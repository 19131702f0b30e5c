"""Runs that cannot trample each other or mix stale outputs: the run lock, stage signatures
(stale stages refused unless forced) and generate's resume key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deliberate_ray.cli import app
from deliberate_ray.generate.store import ShardStore, StaleOutput
from deliberate_ray.pipeline import Stages, StaleStage, signature
from deliberate_ray.results import StageResult
from deliberate_ray.runlock import LOCK_NAME, LockHeld, RunLock


def write_lock(folder, **info) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"pid": os.getpid(), "host": socket.gethostname(), "heartbeat": time.time()}
    (folder / LOCK_NAME).write_text(json.dumps(base | info))


def test_a_second_run_on_a_held_directory_is_refused(tmp_path):
    with RunLock(tmp_path, "pipeline"):
        assert (tmp_path / LOCK_NAME).exists()
        with pytest.raises(LockHeld, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released
    RunLock(tmp_path).acquire().release()  # free again


def test_a_lock_whose_holder_died_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, pid=dead.pid)
    with RunLock(tmp_path) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.token
    assert "taking over the lock" in caplog.text


def test_a_lock_without_heartbeat_is_taken_over_from_any_host(tmp_path):
    write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 3600)
    RunLock(tmp_path).acquire().release()
    write_lock(tmp_path, host="elsewhere", pid=1)  # fresh heartbeat on another host: held
    with pytest.raises(LockHeld, match="elsewhere"):
        RunLock(tmp_path).acquire()


def test_pipeline_on_a_locked_run_dir_exits_2_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    write_lock(run_dir)  # this test process: alive
    import yaml

    demo = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(demo | {"run_dir": str(run_dir)}))
    result = CliRunner().invoke(app, ["pipeline", "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    assert f"pid {os.getpid()}" in result.output and "Traceback" not in result.output


def test_stages_skip_same_signature_refuse_changed_and_force_reruns(tmp_path):
    out = tmp_path / "out"
    calls = []

    class Made(StageResult):
        output_dir: str

    def work() -> Made:
        out.mkdir(exist_ok=True)
        (out / "file").write_text(str(len(calls)))
        calls.append(1)
        return Made(output_dir=str(out))

    outputs = lambda m: [m["output_dir"]]  # noqa: E731
    first = Stages(tmp_path).run("generate", work, Made, "sig-a", outputs)
    assert first.signature == "sig-a" and not first.skipped and len(calls) == 1
    again = Stages(tmp_path).run("generate", work, Made, "sig-a", outputs)
    assert again.skipped and again.output_dir == str(out) and len(calls) == 1
    with pytest.raises(StaleStage, match="--force"):
        Stages(tmp_path).run("generate", work, Made, "sig-b", outputs)
    assert len(calls) == 1 and (out / "file").read_text() == "0"  # nothing touched
    (out / "old").write_text("stale")
    forced = Stages(tmp_path, force=True).run("generate", work, Made, "sig-b", outputs)
    assert forced.signature == "sig-b" and len(calls) == 2
    assert not (out / "old").exists()  # the stale outputs were deleted first


def test_signature_follows_config_values():
    from deliberate_ray.config import EvalConfig

    assert signature(EvalConfig(), "x") == signature(EvalConfig(), "x")
    assert signature(EvalConfig(), "x") != signature(EvalConfig(max_tokens=17), "x")
    assert signature(EvalConfig(), "x") != signature(EvalConfig(), "y")


def test_generate_store_refuses_shards_of_another_resume_key(tmp_path):
    store = ShardStore(tmp_path, key="k1")
    store.commit(["p1"], {"tuples": [], "samples": [], "quarantine": []}, {})
    assert ShardStore(tmp_path, key="k1").done_ids == {"p1"}  # same key: resumes
    with pytest.raises(StaleOutput, match="--fresh"):
        ShardStore(tmp_path, key="k2")
    assert ShardStore(tmp_path, key="k2", fresh=True).done_ids == set()


def test_metrics_log_drops_rows_a_restarted_run_repeats(tmp_path):
    from deliberate_ray.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    MetricsLog(path, resumed_at=5)  # the run died after step 7; its checkpoint is step 5
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    MetricsLog(path, resumed_at=0)  # restarted before any checkpoint: all steps run again
    assert path.read_text() == ""
