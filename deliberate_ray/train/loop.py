"""The training loop: what each Ray Train worker runs, read top to bottom.

Load the model, `parallelize` it (LoRA, FSDP2), build AdamW with warmup + cosine, resume
from the latest checkpoint if there is one, then step: `grad_accum` micro-batches from this
worker's dataset shard, a token-weighted loss (every label token in the global batch counts
the same, whichever rank or micro-batch it sits in), clipping, a metrics line, and a sharded
checkpoint every `checkpoint_every` steps and at the end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deliberate_ray import storage
from deliberate_ray.config import TrainConfig
from deliberate_ray.engines.select import cpu_dtype
from deliberate_ray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from deliberate_ray.train.data import IGNORE
from deliberate_ray.train.metrics import MetricsLog, mfu, peak_flops
from deliberate_ray.train.parallelize import load_base_model, parallelize

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


@dataclass
class Plan:
    """What the driver worked out before training: step counts and where files go."""

    steps_per_epoch: int
    total_steps: int  # the length of the LR schedule
    stop_at: int  # this run ends after this step (== total_steps unless stopped early)
    out_dir: str  # the run folder: a local path or a URI (s3://, gs://)
    checkpoints: bool = True  # False in local mode (num_workers=0): no Ray storage to write to


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int  # real (non-pad) tokens in the global batch


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def trim(batch: Batch) -> Batch:
    """Drop the padding columns every row of the batch has (rows are padded at the tail)."""
    width = max(2, int(batch["num_tokens"].max()))
    return {k: (v if k == "num_tokens" else v[:, :width]) for k, v in batch.items()}


def micro_batches(
    shard: Any, cfg: TrainConfig, plan: Plan, state: TrainState, device: torch.device
) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, micro-batches done in that epoch, batch), forever, resuming at `state`.

    Every worker takes the same number of micro-batches per epoch, so the ranks stay in step.
    """
    per_epoch = plan.steps_per_epoch * cfg.grad_accum
    epoch, skip = state.epoch, state.batch_in_epoch
    if skip >= per_epoch:
        epoch, skip = epoch + 1, 0
    while True:
        batches = shard.iter_torch_batches(
            batch_size=cfg.micro_batch_size, drop_last=True, dtypes=torch.long, device=device
        )
        for i, batch in enumerate(batches):
            if i >= per_epoch:
                break
            if i >= skip:
                yield epoch, i + 1, trim(batch)
        epoch, skip = epoch + 1, 0


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    params: list[nn.Parameter],
    grad_clip: float,
    amp: Callable[[], AbstractContextManager],
    world_size: int,
) -> StepResult:
    """One optimizer step over `batches` (this rank's micro-batches of the global batch)."""
    counts = torch.stack(
        [
            sum((b["labels"][:, 1:] != IGNORE).sum() for b in batches),
            sum(b["num_tokens"].sum() for b in batches),
        ]
    ).float()
    all_reduce_sum(counts)
    label_tokens = counts[0].clamp(min=1)
    loss_sum = torch.zeros((), device=counts.device)
    for b in batches:
        with amp():
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        # Position t predicts token t+1; shifting the labels (not slicing the logits) spares
        # a copy of the largest tensor of the step.
        targets = F.pad(b["labels"][:, 1:], (0, 1), value=IGNORE)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        # FSDP averages gradients over ranks; scaling by world_size turns that into a sum.
        (loss * world_size / label_tokens).backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    all_reduce_sum(loss_sum)
    return StepResult(
        loss=float(loss_sum / label_tokens), grad_norm=float(grad_norm), tokens=int(counts[1])
    )


def autocast(bf16: bool, cpu_bf16: bool, mesh: Any) -> Callable[[], AbstractContextManager]:
    """The forward pass's autocast context: bf16 on a CPU that computes it natively; bf16 on
    a GPU for a whole model (under FSDP2 its MixedPrecisionPolicy casts instead); else none.
    Shared by SFT and the RL update."""
    if cpu_bf16:
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    if bf16 and mesh is None:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: config = {"train": TrainConfig dump, "plan": Plan}."""
    import ray.train
    import ray.train.torch
    from torch.distributed.device_mesh import init_device_mesh

    cfg = TrainConfig.model_validate(config["train"])
    plan = Plan(**config["plan"])
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    if rank == 0:
        log.info(
            "%d worker(s) on %s, %d torch threads each", world, device, torch.get_num_threads()
        )

    model = load_base_model(cfg.model, cfg.attn_implementation)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh(device.type, (world,)) if world > 1 else None
    bf16 = cfg.bf16 and device.type == "cuda"
    # CPUs that compute bf16 natively (AVX512-BF16, AMX): autocast, with fp32 weights, grads
    # and gloo collectives (1.4x faster steps for the embedded model: bench/train_dtype.py).
    cpu_bf16 = cfg.bf16 and device.type == "cpu" and cpu_dtype() == "bfloat16"
    if rank == 0 and device.type == "cpu":
        log.info("compute dtype on CPU: %s", "bf16 autocast" if cpu_bf16 else "fp32")
    model = parallelize(model, cfg, mesh, bf16).to(device).train()
    amp = autocast(bf16, cpu_bf16, mesh)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )
    warmup = math.ceil(cfg.warmup_ratio * plan.total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup, plan.total_steps)
    )

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, cfg.lora.enabled)
        if rank == 0:
            log.info("resumed at step %d (epoch %d)", state.step, state.epoch)

    peak = peak_flops(
        torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", cfg.peak_flops
    )
    resumed_at = state.step  # 0 on a fresh start; else the checkpoint this attempt loaded
    metrics = MetricsLog(
        storage.join(plan.out_dir, "metrics.jsonl") if rank == 0 else None, resumed_at=resumed_at
    )
    batches = micro_batches(ray.train.get_dataset_shard("train"), cfg, plan, state, device)
    while state.step < plan.stop_at:
        start = time.perf_counter()
        group = [next(batches) for _ in range(cfg.grad_accum)]
        lr = scheduler.get_last_lr()[0]
        result = train_step(
            model, optimizer, [b for _, _, b in group], params, cfg.grad_clip, amp, world
        )
        scheduler.step()
        elapsed = time.perf_counter() - start
        state.step += 1
        state.epoch, state.batch_in_epoch = group[-1][0], group[-1][1]
        state.tokens += result.tokens
        row = {
            "step": state.step,
            "total_steps": plan.total_steps,
            "epoch": state.epoch,
            **asdict(result),
            "lr": lr,
            "step_time_s": elapsed,
            "tokens_per_s": result.tokens / elapsed,
            "mfu": mfu(n_params, result.tokens / elapsed, peak, world),
            "tokens_seen": state.tokens,
            "resumed_at": resumed_at,
            "time": time.time(),
        }
        last = state.step == plan.stop_at
        if state.step % cfg.log_every == 0 or last:
            metrics.write(row)
        if plan.checkpoints and (state.step % cfg.checkpoint_every == 0 or last):
            save_checkpoint(model, optimizer, scheduler, state, row, cfg.lora.enabled)
