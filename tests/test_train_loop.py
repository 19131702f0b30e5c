"""The loop's pieces in one process: a checkpoint round trip under FSDP2 (a 1-rank gloo
group) continues exactly as the uninterrupted run, gradient accumulation weighs tokens
evenly, the data resumes at its position, the LR schedule."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from deliberate_ray.config import TrainConfig
from deliberate_ray.train.checkpoint import TrainState, load_checkpoint, write_checkpoint
from deliberate_ray.train.data import IGNORE
from deliberate_ray.train.loop import Batch, Plan, micro_batches, train_step, warmup_cosine
from deliberate_ray.train.parallelize import load_base_model, parallelize


@pytest.fixture
def mesh():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def batches(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 1000, (2, 32), generator=g)
        labels = ids.clone()
        labels[:, :8] = IGNORE  # a prompt
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "position_ids": torch.arange(32).repeat(2, 1),
                "num_tokens": torch.tensor([32, 32]),
            }
        )
    return out


class Trainer:
    """Model, optimizer and schedule built as `train_loop` builds them, on a 1-rank mesh."""

    def __init__(self, model_path: str, lora: bool, mesh: DeviceMesh, seed: int):
        self.cfg = TrainConfig(lora={"enabled": lora, "rank": 4, "dropout": 0.0})
        torch.manual_seed(seed)  # a different seed gives different fresh LoRA weights
        base = load_base_model(model_path)
        self.model = parallelize(base, self.cfg, mesh, bf16=False).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-2, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(1, 6))

    def run(self, data: list[Batch]) -> list[float]:
        losses = []
        for b in data:
            result = train_step(self.model, self.optimizer, [b], self.params, 1.0, nullcontext, 1)
            self.scheduler.step()
            losses.append(result.loss)
        return losses


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpoint_round_trip_continues_exactly(tiny_model: str, mesh, tmp_path, lora: bool):
    data = batches(6)
    first = Trainer(tiny_model, lora, mesh, seed=0)
    first.run(data[:3])
    state = TrainState(step=3, epoch=0, batch_in_epoch=3, tokens=123)
    write_checkpoint(str(tmp_path), first.model, first.optimizer, first.scheduler, state, lora)
    expected = first.run(data[3:])

    second = Trainer(tiny_model, lora, mesh, seed=1)
    ckpt = Checkpoint.from_directory(str(tmp_path))
    restored = load_checkpoint(ckpt, second.model, second.optimizer, second.scheduler, lora)
    assert restored == state
    assert second.run(data[3:]) == pytest.approx(expected, rel=1e-6)
    assert len(list(tmp_path.glob("*.distcp"))) == 1


def test_accumulated_micro_batches_weigh_every_token_the_same(tiny_model: str) -> None:
    """Two micro-batches of one row each take the same step as one batch of both rows,
    although the rows carry different numbers of label tokens."""
    whole = batches(1)[0]
    whole["labels"][1, 8:20] = IGNORE  # row 1 has fewer label tokens than row 0
    halves = [{k: v[i : i + 1] for k, v in whole.items()} for i in (0, 1)]
    results, weights = [], []
    for data in ([whole], halves):
        torch.manual_seed(0)
        model = load_base_model(tiny_model).train()
        params = list(model.parameters())
        optimizer = torch.optim.SGD(params, lr=1.0)
        results.append(train_step(model, optimizer, data, params, 1e9, nullcontext, 1))
        weights.append(torch.cat([p.detach().flatten() for p in params]))
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-6)
    assert results[0].tokens == results[1].tokens == 64
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)


class FakeShard:
    """Stands in for a Ray Train dataset shard: numbered batches of one row each."""

    def __init__(self, n: int):
        self.n = n

    def iter_torch_batches(self, **_: object):
        for i in range(self.n):
            yield {
                "input_ids": torch.full((1, 4), i),
                "labels": torch.full((1, 4), i),
                "position_ids": torch.arange(4).reshape(1, 4),
                "num_tokens": torch.tensor([3]),
            }


def test_micro_batches_resume_at_the_saved_position() -> None:
    tcfg = TrainConfig(micro_batch_size=1, grad_accum=2)
    cpu = torch.device("cpu")
    plan = Plan(steps_per_epoch=2, total_steps=10, stop_at=10, out_dir="/tmp")
    shard = FakeShard(5)  # 5 batches, 4 used per epoch (2 steps x 2 micro-batches)
    fresh = micro_batches(shard, tcfg, plan, TrainState(), cpu)
    seen = [(e, k, int(b["input_ids"][0, 0])) for e, k, b in (next(fresh) for _ in range(6))]
    assert seen == [(0, 1, 0), (0, 2, 1), (0, 3, 2), (0, 4, 3), (1, 1, 0), (1, 2, 1)]
    assert next(fresh)[2]["input_ids"].shape == (1, 3)  # trimmed to the real tokens
    resumed = micro_batches(shard, tcfg, plan, TrainState(epoch=0, batch_in_epoch=2), cpu)
    assert [(e, k) for e, k, _ in (next(resumed) for _ in range(3))] == [(0, 3), (0, 4), (1, 1)]
    at_end = micro_batches(shard, tcfg, plan, TrainState(epoch=0, batch_in_epoch=4), cpu)
    assert next(at_end)[:2] == (1, 1)


def test_warmup_then_cosine() -> None:
    f = warmup_cosine(warmup=2, total=10)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.5)
    assert f(10) == pytest.approx(0.0) and f(12) == pytest.approx(0.0)
