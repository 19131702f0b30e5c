"""A training checkpoint -> a Hugging Face model folder that transformers and vLLM load.

Full fine-tuning and merged LoRA give safetensors weights in the base model's dtype, plus the
tokenizer with its chat template. `lora.merge_on_export: false` writes the adapter alone
(adapter_config.json names the base model): transformers loads it through peft, vLLM serves
it as a LoRA module on the base model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from deliberate_ray.config import TrainConfig
from deliberate_ray.train.checkpoint import load_model_weights
from deliberate_ray.train.data import student_template
from deliberate_ray.train.parallelize import apply_lora, load_base_model

log = logging.getLogger(__name__)


def export_hf(checkpoint_dir: str, cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """Write the export to `out_dir` (replacing an older one whole); returns what was written."""
    from transformers import AutoConfig, AutoTokenizer

    base_dtype = AutoConfig.from_pretrained(cfg.model).dtype or torch.float32
    # In the model's own dtype (bf16 for most): an 8B model is 16 GB, not fp32's 32 GB; the
    # checkpoint's fp32 master weights are cast as they are copied in.
    model: Any = load_base_model(cfg.model, dtype=base_dtype)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    load_model_weights(checkpoint_dir, model, cfg.lora.enabled)
    kind = "full"
    if cfg.lora.enabled and cfg.lora.merge_on_export:
        model, kind = model.merge_and_unload(), "lora_merged"
    elif cfg.lora.enabled:
        kind = "lora_adapter"
    model = model.to(base_dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok = AutoTokenizer.from_pretrained(cfg.model)
        tok.chat_template = student_template(tok.chat_template, cfg.variant)  # as it learned
        tok.save_pretrained(str(tmp))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s model to %s", kind, out_dir)
    return {"export_dir": str(out_dir), "export_kind": kind, "base_model": cfg.model}
