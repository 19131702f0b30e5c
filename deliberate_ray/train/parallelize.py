"""The base model, then adapters and sharding applied to it apart from the loop.

Order: gradient checkpointing (a model flag), then LoRA (wraps the linears), then FSDP2
(`fully_shard` on each decoder block, then on the root). Sharding last means LoRA's few
trainable weights sit in the same FSDP units as the frozen ones they adapt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from deliberate_ray.config import LoraConfig, TrainConfig


def load_base_model(
    ref: str, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> Any:
    """The base model in fp32 (master weights; `dtype` for the export), as plain weights.
    `ref` is any model reference, resolved in this process (`models.resolve_model`: a URI or
    the embedded model into this node's cache).

    A config saved from a GGUF conversion still names its quantization; loading with it
    would mark the model as quantized, which refuses `save_pretrained` at export.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from deliberate_ray.models import resolve_model

    path = resolve_model(ref)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=attn_implementation
    )


def apply_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (transformers names their classes in `_no_split_modules`)."""
    hf_model: Any = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(hf_model._no_split_modules or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(hf_model).__name__}: no decoder blocks named {sorted(names)}")
    return blocks


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, bf16: bool) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def parallelize(
    model: nn.Module, cfg: TrainConfig, mesh: DeviceMesh | None, bf16: bool
) -> nn.Module:
    """Checkpointing, LoRA and FSDP2 as the config asks; `mesh=None` leaves the model whole."""
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if mesh is not None:
        apply_fsdp(model, mesh, bf16)
    return model
