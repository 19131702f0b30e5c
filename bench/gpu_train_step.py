"""The training step of deliberate_ray.train (FSDP2, packing, bf16) on a ~1B random-initialised
Llama, torch only (no Ray): step time, tokens/s and MFU against the device's bf16 peak.

The model, the packed rows and the step are the ones `run_train` uses: `parallelize`
(FSDP2 with bf16 mixed precision), `pack_examples` on the generation stage's lengths
(prompts 20-60 tokens without loss, CoT + answer 60-250), and `train_step`.

    python bench/gpu_train_step.py                          # one GPU
    torchrun --nproc-per-node 8 bench/gpu_train_step.py     # every GPU of a node
    python bench/gpu_train_step.py --tiny                   # CPU smoke test, 2-layer model
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from deliberate_ray.config import TrainConfig
from deliberate_ray.train.data import IGNORE, pack_examples
from deliberate_ray.train.loop import train_step
from deliberate_ray.train.metrics import mfu, peak_flops
from deliberate_ray.train.parallelize import parallelize

LLAMA_1B = {  # 1.07e9 parameters with the SmolLM2 vocabulary
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 49152,
}
LLAMA_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
}


def packed_batch(
    rows: int, seq_len: int, vocab: int, device: torch.device, rng: random.Random
) -> dict[str, torch.Tensor]:
    """`rows` packed rows of synthetic examples with the generation stage's lengths."""
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    while sum(len(x) for x in ids) < rows * seq_len * 1.1:
        prompt = rng.randint(20, 60)
        reply = min(rng.randint(60, 250), seq_len - prompt)
        tokens = [rng.randrange(vocab) for _ in range(prompt + reply)]
        ids.append(tokens)
        labels.append([IGNORE] * prompt + tokens[prompt:])
    packed = pack_examples(ids, labels, seq_len, pad_id=0, packing=True, seed=0)
    return {k: torch.as_tensor(v[:rows], device=device) for k, v in packed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer model on CPU, fp32")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--peak-flops", type=float, default=None, help="per device; else table")
    args = parser.parse_args()
    if args.tiny:
        args.seq_len, args.micro_batch, args.steps, args.warmup = 256, 2, 3, 1

    use_cuda = torch.cuda.is_available() and not args.tiny
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:  # one process: still FSDP2 (a 1-device mesh), so the step is the same code path
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    torch.manual_seed(0)
    shape = LLAMA_TINY if args.tiny else LLAMA_1B
    config = LlamaConfig(**shape, max_position_embeddings=args.seq_len, tie_word_embeddings=True)
    config._attn_implementation = args.attn
    with device:
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(
        gradient_checkpointing=args.gradient_checkpointing, attn_implementation=args.attn
    )
    mesh = dist.device_mesh.init_device_mesh(device.type, (world,))
    model = parallelize(model, cfg, mesh, bf16=use_cuda).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=use_cuda)
    batch = packed_batch(
        args.micro_batch, args.seq_len, shape["vocab_size"], device, random.Random(rank)
    )

    def sync() -> None:
        if use_cuda:
            torch.cuda.synchronize()

    times, tokens = [], 0
    for step in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        result = train_step(model, optimizer, [batch], params, 1.0, contextlib.nullcontext, world)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens += result.tokens
    rate = tokens / sum(times)
    name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
    peak = peak_flops(name, args.peak_flops)
    util = mfu(n_params, rate, peak, world)
    if rank == 0:
        print(
            f"device {name} x{world}  params {n_params / 1e6:,.1f}M  "
            f"{'bf16' if use_cuda else 'fp32'}  seq {args.seq_len}  micro-batch {args.micro_batch}"
        )
        print(f"step {1000 * sum(times) / len(times):.1f} ms  loss {result.loss:.3f}")
        print(f"tokens/s {rate:,.0f} (all devices, real tokens)")
        print(
            "MFU "
            + (
                "n/a (no peak for this device: --peak-flops)"
                if util is None
                else f"{100 * util:.1f}%"
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
