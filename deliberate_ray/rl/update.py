"""The policy update on Ray Train: what each worker runs once per RL iteration.

Load the SFT model, `parallelize` it as SFT does (LoRA, then FSDP2), restore the previous
iteration's checkpoint (adapter or weights, optimizer), read this worker's shard of the
iteration's rollouts, compute the log probabilities of the policy that sampled them (pi_old)
and of the SFT reference (with LoRA: the same model with its adapters off; else a frozen
copy), then take `epochs_per_iteration` passes of GRPO steps (rl/grpo.py) and write a
sharded checkpoint `update_NNNN` that the next iteration resumes from and the export reads.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deliberate_ray import storage
from deliberate_ray.config import RLConfig, TrainConfig
from deliberate_ray.engines.select import cpu_dtype
from deliberate_ray.rl.grpo import TokenStats, grpo_token_losses, kl_k3, token_logprobs
from deliberate_ray.train.checkpoint import TrainState, load_checkpoint, write_checkpoint
from deliberate_ray.train.loop import all_reduce_sum, autocast
from deliberate_ray.train.parallelize import apply_fsdp, load_base_model, parallelize

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


def checkpoint_name(iteration: int) -> str:
    return f"update_{iteration:04d}"


def collate(rows: list[dict[str, Any]], pad_id: int, device: torch.device) -> Batch:
    """Right-padded ids, attention mask, and the mask of the targets that are reply tokens
    (target t is token t+1)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    reply = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        attn[i, :n] = 1
        reply[i, int(r["prompt_len"]) - 1 : n - 1] = 1.0
    adv = torch.tensor([float(r["advantage"]) for r in rows], dtype=torch.float32)
    return {
        "input_ids": ids.to(device),
        "attention_mask": attn.to(device),
        "mask": reply.to(device),
        "advantage": adv.to(device),
    }


def logprobs(model: nn.Module, b: Batch, amp: Any) -> torch.Tensor:
    with amp():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return token_logprobs(logits[:, :-1], b["input_ids"][:, 1:])


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    with model.disable_adapter():  # type: ignore[operator]
        yield


def rl_update_loop(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: config = {"rl": RLConfig dump, "train": the
    TrainConfig `parallelize` and the export read, "iteration", "iter_dir"}."""
    import ray.train
    import ray.train.torch
    from torch.distributed.device_mesh import init_device_mesh

    rl = RLConfig.model_validate(config["rl"])
    tcfg = TrainConfig.model_validate(config["train"])
    iteration: int = config["iteration"]
    context = ray.train.get_context()
    world, rank = context.get_world_size(), context.get_world_rank()
    device = ray.train.torch.get_device() if rl.use_gpu else torch.device("cpu")
    torch.manual_seed(rl.seed + iteration)
    started = time.perf_counter()

    model = load_base_model(tcfg.model, tcfg.attn_implementation)
    model.config.use_cache = False
    mesh = init_device_mesh(device.type, (world,)) if world > 1 else None
    bf16 = rl.bf16 and device.type == "cuda"
    cpu_bf16 = rl.bf16 and device.type == "cpu" and cpu_dtype() == "bfloat16"
    model = parallelize(model, tcfg, mesh, bf16).to(device)
    amp = autocast(bf16, cpu_bf16, mesh)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=rl.lr, weight_decay=0.0, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, rl.lora.enabled)
        if rank == 0:
            log.info("update %d: resumed after %d steps", iteration, state.step)

    from deliberate_ray.models import load_tokenizer

    pad_id = load_tokenizer(tcfg.model).pad_token_id
    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    mbs = rl.micro_batch_size
    batches = [collate(rows[i : i + mbs], pad_id, device) for i in range(0, len(rows), mbs)]

    # pi_old (the policy that sampled the rollouts: these weights) and the SFT reference.
    model.eval()
    with torch.no_grad():
        for b in batches:
            b["old"] = logprobs(model, b, amp)
        if rl.lora.enabled:
            with adapters_off(model):
                for b in batches:
                    b["ref"] = logprobs(model, b, amp)
        else:
            ref: Any = load_base_model(tcfg.model, tcfg.attn_implementation)
            if mesh is not None:
                apply_fsdp(ref, mesh, bf16)
            ref = ref.to(device).eval()
            for b in batches:
                b["ref"] = logprobs(ref, b, amp)
            del ref
    rollout_kl = torch.zeros(2, dtype=torch.float64, device=device)
    for b in batches:
        rollout_kl[0] += float((kl_k3(b["old"], b["ref"]) * b["mask"]).sum())
        rollout_kl[1] += float(b["mask"].sum())
    all_reduce_sum(rollout_kl)
    model.train()

    totals = TokenStats(0.0, 0.0, 0.0, 0.0, 0.0)
    grad_norms: list[float] = []
    losses: list[float] = []
    for _ in range(rl.epochs_per_iteration):
        for g in range(0, len(batches), rl.grad_accum):
            group = batches[g : g + rl.grad_accum]
            count = all_reduce_sum(torch.stack([sum(b["mask"].sum() for b in group)]).float())
            denom = count[0].clamp(min=1)
            step_loss = torch.zeros((), device=device)
            for b in group:
                lp = logprobs(model, b, amp)
                loss, stats = grpo_token_losses(
                    lp, b["old"], b["ref"], b["advantage"], b["mask"], rl.clip_eps, rl.kl_coef
                )
                # FSDP averages gradients over ranks; world / denom makes it a token mean.
                (loss * world / denom).backward()
                step_loss += loss.detach().float()
                for k, v in asdict(stats).items():
                    setattr(totals, k, getattr(totals, k) + v)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, rl.grad_clip)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            grad_norms.append(float(grad_norm))
            losses.append(float(all_reduce_sum(step_loss) / denom))

    sums = all_reduce_sum(
        torch.tensor(list(asdict(totals).values()), dtype=torch.float64, device=device)
    )
    tokens = max(float(sums[0]), 1.0)
    state.epoch = iteration
    metrics = {
        "iteration": iteration,
        "step": state.step,
        "update_steps": len(losses),
        "loss": sum(losses) / max(1, len(losses)),
        "kl_rollout": float(rollout_kl[0] / rollout_kl[1].clamp(min=1)),
        "kl_update": float(sums[2]) / tokens,
        "clip_frac": float(sums[3]) / tokens,
        "ratio_mean": float(sums[4]) / tokens,
        "grad_norm": sum(grad_norms) / max(1, len(grad_norms)),
        "update_tokens": int(sums[0]),
        "worker_s": round(time.perf_counter() - started, 2),
    }
    if rank == 0:
        log.info("update %d: %s", iteration, metrics)
        # The iteration folder may be a URI: the workers write to the bucket themselves.
        path = storage.join(config["iter_dir"], "update.json")
        storage.write_text(path, json.dumps(metrics, indent=2))
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, model, optimizer, scheduler, state, rl.lora.enabled)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_name(iteration),
        )


def update_config(rl: RLConfig, init_model: str) -> TrainConfig:
    """The TrainConfig that `parallelize` and the export read. Variant `no_cot`: the export
    ships the SFT model's chat template as it is (a `cot` export's already opens the think
    block)."""
    return TrainConfig(
        model=init_model,
        variant="no_cot",
        num_workers=rl.num_workers,
        use_gpu=rl.use_gpu,
        resources_per_worker=rl.resources_per_worker,
        lora=rl.lora,
        bf16=rl.bf16,
        gradient_checkpointing=rl.gradient_checkpointing,
        attn_implementation=rl.attn_implementation,
        seed=rl.seed,
    )


def parent_of(path: str | PathLike) -> str:
    """The folder holding `path`: a URI's parent stays a URI."""
    if storage.is_remote(path):
        return str(path).rstrip("/").rsplit("/", 1)[0]
    return str(Path(path).parent)


def fit_update(
    rl: RLConfig,
    tcfg: TrainConfig,
    rows: Any,
    iteration: int,
    out_dir: str | PathLike,
    iter_dir: str | PathLike,
) -> Any:
    """One Ray Train run of the update on `rows` (a pyarrow table); the run's name and
    storage are the RL run folder (a local folder or a URI), so each fit resumes from the
    previous checkpoint."""
    import ray
    import ray.data

    from deliberate_ray.train.run import fit_and_release, torch_trainer

    if not ray.is_initialized():
        ray.init()
    trainer = torch_trainer(
        rl_update_loop,
        {
            "rl": rl.model_dump(),
            "train": tcfg.model_dump(),
            "iteration": iteration,
            "iter_dir": str(iter_dir),
        },
        ray.data.from_arrow(rows),
        name=storage.name(out_dir),
        storage_path=parent_of(out_dir),
        workers=(rl.num_workers, rl.use_gpu, rl.resources_per_worker),
        keep_checkpoints=rl.keep_checkpoints,
        max_failures=0,
    )
    return fit_and_release(trainer)
