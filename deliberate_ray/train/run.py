"""`run_train`: data -> Ray Train (TorchTrainer) -> HF export. What the CLI, jobs/train.py
and the pipeline call; the pipeline trains several arms from one config by overriding
`variant`, `name` and `data`.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from dataclasses import asdict
from os import PathLike
from typing import Any

from deliberate_ray import storage
from deliberate_ray.config import Config, ConfigError, TrainConfig, override
from deliberate_ray.models import portable_ref, resolve_model
from deliberate_ray.results import TrainResult
from deliberate_ray.train.data import DataStats, TrainDataError, build_dataset
from deliberate_ray.train.export import export_hf
from deliberate_ray.train.loop import Plan, train_loop

log = logging.getLogger(__name__)


def train_config(cfg: Config, **overrides: Any) -> TrainConfig:
    """The `train` section with the given fields replaced (None leaves a field as it is)."""
    if cfg.train is None:
        raise ConfigError("config", ["train: missing section -> add a `train:` mapping"])
    return override(cfg.train, "train", **overrides)


def plan_steps(
    cfg: TrainConfig, stats: DataStats, out_dir: str | PathLike, stop_after: int | None
) -> Plan:
    world = max(1, cfg.num_workers)
    rows_per_step = world * cfg.micro_batch_size * cfg.grad_accum
    steps_per_epoch = stats.rows // rows_per_step
    if steps_per_epoch == 0:
        raise TrainDataError(
            f"train data packs into {stats.rows} rows of {cfg.max_seq_len} tokens, but one step "
            f"takes max(1, num_workers) * micro_batch_size * grad_accum = {rows_per_step} rows; "
            "lower micro_batch_size or grad_accum, or add data"
        )
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    return Plan(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        stop_at=min(total, stop_after or total),
        out_dir=str(out_dir),
        checkpoints=cfg.num_workers > 0,
    )


def run_train(section: TrainConfig, run_dir: str, *, stop_after: int | None = None) -> TrainResult:
    """Train `section.model` on `section.data` (resuming the run of the same `name` if it has
    checkpoints) and export, in `{section.output_dir or run_dir/train}/{name}`.

    `stop_after` ends this run after that many optimizer steps, with a checkpoint there;
    rerunning continues (how a job with a fixed time slot trains in pieces). The pipeline
    trains several arms from one section by overriding `variant`, `name`, `data`, `model`.
    """
    import ray
    import ray.train

    tcfg = section
    if not tcfg.data:
        raise ConfigError(
            "train.data", ["no training files -> give `data:` (or run generate first)"]
        )
    # A local folder or a URI (s3://, gs://): Ray Train's storage, the metrics and the export
    # all go there, and a rerun resumes from the checkpoints found there.
    parent = storage.absolute(tcfg.output_dir or storage.join(run_dir, "train"))
    out_dir = storage.join(parent, tcfg.name)
    storage_root = tcfg.storage_path or parent
    # Resolved here so that a bad reference fails now; the workers get the portable form and
    # resolve it on their own node (a URI or the embedded model into that node's cache).
    resolve_model(tcfg.model)
    tcfg = tcfg.model_copy(update={"model": portable_ref(tcfg.model)})
    if not ray.is_initialized():
        ray.init()
    dataset, stats = build_dataset(tcfg, tcfg.data)
    plan = plan_steps(tcfg, stats, out_dir, stop_after)
    log.info(
        "training %s (%s) on %d worker(s): %d steps (%d per epoch), run folder %s",
        tcfg.name,
        tcfg.variant,
        tcfg.num_workers,
        plan.total_steps,
        plan.steps_per_epoch,
        out_dir,
    )
    trainer = torch_trainer(
        train_loop,
        {"train": tcfg.model_dump(), "plan": asdict(plan)},
        dataset,
        name=tcfg.name,
        storage_path=storage_root,
        workers=(tcfg.num_workers, tcfg.use_gpu, tcfg.resources_per_worker),
        keep_checkpoints=tcfg.keep_checkpoints,
        max_failures=tcfg.max_failures,
    )
    result = fit_and_release(trainer)
    summary = TrainResult(
        name=tcfg.name,
        variant=tcfg.variant,
        run_dir=out_dir,
        metrics_path=storage.join(out_dir, "metrics.jsonl"),
        final_loss=(result.metrics or {}).get("loss"),
        steps=(result.metrics or {}).get("step"),
        data=asdict(stats),
    )
    if result.checkpoint is None:
        log.warning("no checkpoint to export (num_workers=0 runs without Ray Train storage)")
        return summary
    exported = export_on_worker(result.checkpoint, tcfg, storage.join(out_dir, "export"))
    return summary.model_copy(
        update={"checkpoint_path": checkpoint_uri(result.checkpoint, storage_root), **exported}
    )


def checkpoint_uri(checkpoint: Any, storage_root: str) -> str:
    """Where a Ray Train checkpoint is, as a path or URI the storage functions (and
    `ray.train.Checkpoint(path=...)`) take: Ray keeps a remote one as a path inside its pyarrow
    filesystem, without the scheme (`bucket/run/step_000003`)."""
    path = str(checkpoint.path)
    if not storage.is_remote(storage_root) or storage.is_remote(path):
        return path
    scheme = str(storage_root).split("://", 1)[0]
    return f"{scheme}://{path.lstrip('/')}"


def torch_trainer(
    loop: Any,
    loop_config: dict[str, Any],
    dataset: Any,
    *,
    name: str,
    storage_path: str,
    workers: tuple[int, bool, dict[str, float] | None],
    keep_checkpoints: int | None,
    max_failures: int,
) -> Any:
    """A TorchTrainer as SFT and the RL update run it: `workers` = (number, use_gpu,
    resources per worker); checkpoints under `{storage_path}/{name}` (a folder or a URI),
    the latest `keep_checkpoints` kept; the dataset's shards in a fixed order, so each worker
    gets the same rows on every run and resuming at a micro-batch count resumes at the same
    data."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    num_workers, use_gpu, resources = workers
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources or None
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(
            execution_options=ExecutionOptions(preserve_order=True)
        ),
    )


def export_on_worker(checkpoint: Any, tcfg: TrainConfig, out_dir: str) -> dict[str, Any]:
    """The HF export as a Ray task on a worker like the training's (a GPU node when training
    used GPUs), not in the driver: it loads the base model in its own dtype and reads only
    the model's shards of the checkpoint. `out_dir` must be on storage the driver and the
    Serve replicas see: shared storage (the cluster configs put run_dir there) or a URI
    (s3://, gs://), which the worker uploads the export to."""
    import ray

    def export(ckpt: Any) -> dict[str, Any]:
        with ckpt.as_directory() as ckpt_dir:
            return export_hf(ckpt_dir, tcfg, out_dir)

    resources = dict(tcfg.resources_per_worker or {})
    num_cpus = resources.pop("CPU", 1)
    num_gpus = resources.pop("GPU", 1 if tcfg.use_gpu else 0)
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None)(export)
    return ray.get(task.remote(checkpoint))


def fit_and_release(trainer: Any) -> Any:
    """`trainer.fit()`, then the SIGINT handler it installs put back. Ray Train's handler holds
    the run's controller actor, which stays alive (~0.25 GiB) until the handler goes: in the
    pipeline that was through the eval, where memory is tightest; and a later Ctrl-C would
    call a finished run's controller."""
    before = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)
