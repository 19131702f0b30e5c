"""Sharded checkpoints: torch.distributed.checkpoint on every rank, persisted by Ray Train.

Each rank writes its shards into a local temp dir and hands it to `ray.train.report`, which
merges the ranks' dirs into one checkpoint under `{storage_path}/{name}` (local or `s3://`).
With LoRA only the trainable weights are saved: the frozen base comes from the model itself.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


@dataclass
class TrainState:
    """Where training stands: optimizer steps done, and the data position (per worker)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches this worker consumed in `epoch`
    tokens: int = 0  # real (non-pad) tokens trained on, all workers


def options(lora: bool) -> StateDictOptions:
    # With LoRA the frozen base is neither saved nor expected back (hence not strict).
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def _payload(
    model: nn.Module, optimizer: Any, scheduler: Any, state: TrainState, lora: bool
) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options(lora))
    return {
        "model": model_sd,
        "optim": optim_sd,
        "scheduler": scheduler.state_dict(),
        "train_state": asdict(state),
    }


def write_checkpoint(
    path: str, model: nn.Module, optimizer: Any, scheduler: Any, state: TrainState, lora: bool
) -> None:
    """This rank's shards (and, from rank 0, the metadata) into the folder `path`."""
    dcp.save(_payload(model, optimizer, scheduler, state, lora), checkpoint_id=path)


def save_checkpoint(
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    metrics: dict[str, Any],
    lora: bool,
) -> None:
    """Write this rank's shards and report them (every rank must call this, in step)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, model, optimizer, scheduler, state, lora)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"step_{state.step:06d}",
        )


def load_checkpoint(
    checkpoint: Any, model: nn.Module, optimizer: Any, scheduler: Any, lora: bool
) -> TrainState:
    """Restore model, optimizer, scheduler and data position from a Ray Train checkpoint."""
    payload = _payload(model, optimizer, scheduler, TrainState(), lora)
    with checkpoint.as_directory() as path:
        dcp.load(payload, checkpoint_id=path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=payload["model"],
        optim_state_dict=payload["optim"],
        options=options(lora),
    )
    scheduler.load_state_dict(payload["scheduler"])
    return TrainState(**payload["train_state"])


def load_model_weights(path: str, model: nn.Module, lora: bool) -> None:
    """Load only the model's weights from a checkpoint dir, in one process (for export)."""
    model_sd = get_model_state_dict(model, options=options(lora))
    dcp.load({"model": model_sd}, checkpoint_id=path, no_dist=True)
    set_model_state_dict(model, model_sd, options=options(lora))
