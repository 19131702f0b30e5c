"""TRAIN and RL with the run directory in a bucket (`run_dir: s3://...`), on the loopback S3
server (moto) of conftest.py.

A training run in the bucket, stopped and resumed from the bucket's checkpoint, is
tests/test_train_ray.py::test_full_finetune_stopped_after_a_checkpoint_resumes_there; the
whole pipeline, killed and resumed, is tests/test_pipeline.py. Here: model refs in a
bucket, and RL's run folder is checked at the unit level (its files, the export the next
iteration samples with, the report), without another slow RL run: the update's Ray Train
storage is the same mechanism the training run exercises.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pytest

from deliberate_ray import storage
from deliberate_ray.config import Config, ConfigError, RLConfig
from deliberate_ray.models import ModelRefError, resolve_model


def read_jsonl(uri: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in storage.read_text(uri).splitlines()]


def ls(uri: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache()
    return sorted(storage.name(p) for p in fs.ls(path))


# ------------------------------------------------------------------ train on Ray


# ------------------------------------------------------------------ model refs


def test_a_model_ref_in_a_bucket_resolves_to_a_local_copy(s3_bucket: str, tiny_model) -> None:
    with pytest.raises(ModelRefError, match="does not exist"):
        resolve_model(f"{s3_bucket}/nothing/here")
    storage.write_text(f"{s3_bucket}/notamodel/readme.txt", "hi")
    with pytest.raises(ModelRefError, match="no config.json"):
        resolve_model(f"{s3_bucket}/notamodel")
    storage.upload_dir(tiny_model, f"{s3_bucket}/tiny")
    local = resolve_model(f"{s3_bucket}/tiny")
    assert storage.exists(f"{local}/config.json") and not storage.is_remote(local)


def test_workers_get_a_portable_model_ref_and_resolve_it_on_their_own_node(
    s3_bucket: str, tiny_model: str, tmp_path, monkeypatch, ray_session
) -> None:
    """Training hands its workers the URI (or the embedded ref), not the driver's cache path,
    and the worker-side loader resolves it into the cache of the node it runs on: here a Ray
    task whose DELIBERATE_RAY_CACHE is an empty folder stands in for another node."""
    import ray

    from deliberate_ray.models import EMBEDDED, TINY, portable_ref

    uri = f"{s3_bucket}/base"
    storage.upload_dir(tiny_model, uri)
    assert portable_ref(uri) == uri and portable_ref(EMBEDDED) == EMBEDDED
    assert portable_ref(TINY) == TINY and portable_ref("org/some-model") == "org/some-model"
    monkeypatch.chdir(tiny_model)
    assert portable_ref(".") == str(Path(tiny_model).resolve())  # made absolute

    other_node = tmp_path / "other-node-cache"

    @ray.remote(runtime_env={"env_vars": {"DELIBERATE_RAY_CACHE": str(other_node)}})
    def load_there(ref: str) -> tuple[int, str]:
        from deliberate_ray.train.parallelize import load_base_model

        model = load_base_model(ref)
        return sum(p.numel() for p in model.parameters()), os.environ["DELIBERATE_RAY_CACHE"]

    n_params, cache = ray.get(load_there.remote(uri))
    assert n_params > 0 and cache == str(other_node)
    assert list((other_node / "remote").iterdir())  # downloaded there, by the worker

    # What run_train hands the Ray Train workers: the URI, not this process's cache path.
    import pyarrow.parquet as pq
    from test_train_ray import tuple_rows

    from deliberate_ray.contracts import TUPLE, to_table
    from deliberate_ray.train import run as train_run

    pq.write_table(to_table(tuple_rows(48), TUPLE), tmp_path / "tuples.parquet")
    cfg = Config.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "train": {
                "model": uri,
                "data": [str(tmp_path / "tuples.parquet")],
                "max_seq_len": 256,
                "micro_batch_size": 1,
                "num_workers": 1,
                "max_steps": 1,
            },
        }
    )
    handed: dict[str, Any] = {}

    class Handed(Exception):
        pass

    def capture(loop, config, *args, **kwargs):
        handed.update(config)
        raise Handed

    monkeypatch.setattr(train_run, "torch_trainer", capture)
    with pytest.raises(Handed):
        train_run.run_train(cfg.train, cfg.run_dir)
    assert handed["train"]["model"] == uri


# ------------------------------------------------------------------ RL's run folder


def rl_cfg(run_dir: str, **rl: Any) -> Config:
    return Config.model_validate({"run_dir": run_dir, "rl": {"engine": {"kind": "hf"}} | rl})


def test_rl_run_folder_in_a_bucket(s3_bucket: str, tiny_model: str) -> None:
    """The RL run's files through storage: the resume key, the iterations' metrics, the
    export the next iteration samples with (read back as a local copy), the report and the
    reward curve; a missing SFT export in the bucket is the usual config error."""
    from deliberate_ray.rl.run import (
        EXPORT_MARK,
        RLRun,
        check_key,
        resolve_init,
        write_rl_report,
    )
    from deliberate_ray.rl.update import parent_of

    cfg = rl_cfg(f"{s3_bucket}/run")
    assert cfg.rl is not None
    with pytest.raises(ConfigError, match=r"(?s)rl.init_model.*train/cot/export does not exist"):
        resolve_init(cfg, cfg.rl)
    storage.upload_dir(tiny_model, f"{s3_bucket}/run/train/cot/export")
    assert not storage.is_remote(resolve_init(cfg, cfg.rl))  # the SFT export, copied here

    out = f"{s3_bucket}/run/rl/cot"
    assert parent_of(out) == f"{s3_bucket}/run/rl"  # Ray Train's storage_path for updates
    check_key(out, "k1")
    check_key(out, "k1")
    with pytest.raises(ConfigError, match="another rl config"):
        check_key(out, "k2")

    run = RLRun.__new__(RLRun)  # the folder handling alone: no spec, prompts or engines
    run.out, run.rl, run.init = out, RLConfig.model_validate({"iterations": 2}), tiny_model
    assert run.policy_for(1) == tiny_model
    with pytest.raises(RuntimeError, match="no export and no checkpoint"):
        run.policy_for(2)
    row = {
        "iteration": 1,
        "reward_mean": 0.5,
        "reward_std": 0.1,
        "reward_components": {"action": None, "format": None, "judge": None, "custom": 0.5},
        "kl": 0.0,
        "response_tokens_mean": 7.0,
        "truncation_rate": 0.0,
        "no_answer_rate": 0.0,
        "time_s": {"rollout": 1, "reward": 1, "update": 1, "sync": 1, "iteration": 4},
        "rollout_tokens_per_s": 10.0,
        "heldin": None,
    }
    storage.write_text(f"{run.iter_dir(1)}/metrics.json", json.dumps(row))
    assert run.done(1) and not run.done(2)
    assert run.metrics() == [row]
    assert read_jsonl(f"{out}/metrics.jsonl") == [row]

    storage.upload_dir(tiny_model, f"{out}/export")
    storage.write_text(f"{out}/export/{EXPORT_MARK}", json.dumps({"iteration": 1}))
    policy = run.policy_for(2)
    assert policy == f"{out}/export"  # the URI: engines read it through resolve_model
    assert storage.exists(f"{resolve_model(policy)}/{EXPORT_MARK}")

    report = write_rl_report(out, run.rl, tiny_model, [row], None)
    assert report == f"{out}/report.md"
    text = storage.read_text(report)
    assert "reward_curve.png" in text and f"`{out}/export`" in text
    assert storage.read_bytes(f"{out}/reward_curve.png").startswith(b"\x89PNG")
    storage.write_table(f"{run.iter_dir(1)}/rollouts.parquet", pa.table({"a": [1]}))
    assert sorted(ls(run.iter_dir(1))) == ["metrics.json", "rollouts.parquet"]
