"""A training checkpoint -> a Hugging Face model folder that transformers and vLLM load.

Full fine-tuning and merged LoRA give safetensors weights in the base model's dtype, plus the
tokenizer with its chat template. `lora.merge_on_export: false` writes the adapter alone
(adapter_config.json names the base model): transformers loads it through peft, vLLM serves
it as a LoRA module on the base model.

The export goes to a local folder (written beside it, then renamed into place) or to a URI
(s3://, gs://): saved into a local temp folder on this machine, then uploaded with
`config.json` last (`storage.upload_dir`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from deliberate_ray import storage
from deliberate_ray.config import TrainConfig
from deliberate_ray.train.checkpoint import load_model_weights
from deliberate_ray.train.data import student_template
from deliberate_ray.train.parallelize import apply_lora, load_base_model

log = logging.getLogger(__name__)


def export_hf(
    checkpoint_dir: str | PathLike, cfg: TrainConfig, out_dir: str | PathLike
) -> dict[str, Any]:
    """Write the export to `out_dir` (replacing an older one whole); returns what was written.
    `checkpoint_dir` and `out_dir` may each be a local folder or a URI."""
    if storage.is_remote(checkpoint_dir):
        with tempfile.TemporaryDirectory(prefix="checkpoint.") as local_ckpt:
            fs, path = storage.filesystem(checkpoint_dir)
            fs.get(path.rstrip("/") + "/", local_ckpt, recursive=True)
            return export_hf(local_ckpt, cfg, out_dir)
    from transformers import AutoConfig, AutoTokenizer

    from deliberate_ray.models import resolve_model

    base = resolve_model(cfg.model)  # on the node that exports (a cached local copy)
    base_dtype = AutoConfig.from_pretrained(base).dtype or torch.float32
    # In the model's own dtype (bf16 for most): an 8B model is 16 GB, not fp32's 32 GB; the
    # checkpoint's fp32 master weights are cast as they are copied in.
    model: Any = load_base_model(base, dtype=base_dtype)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    load_model_weights(str(checkpoint_dir), model, cfg.lora.enabled)
    kind = "full"
    if cfg.lora.enabled and cfg.lora.merge_on_export:
        model, kind = model.merge_and_unload(), "lora_merged"
    elif cfg.lora.enabled:
        kind = "lora_adapter"
    model = model.to(base_dtype)

    def save(folder: Path) -> None:
        model.save_pretrained(str(folder), safe_serialization=True)
        tok = AutoTokenizer.from_pretrained(base)
        tok.chat_template = student_template(tok.chat_template, cfg.variant)  # as it learned
        tok.save_pretrained(str(folder))

    if storage.is_remote(out_dir):
        out = str(out_dir)
        with tempfile.TemporaryDirectory(prefix="export.") as tmp:
            save(Path(tmp))
            storage.upload_dir(tmp, out)
    else:
        local = Path(out_dir)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=local.name + ".", dir=local.parent))
        try:
            save(tmp)
            shutil.rmtree(local, ignore_errors=True)
            tmp.rename(local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out = str(local)
    log.info("exported %s model to %s", kind, out)
    return {"export_dir": out, "export_kind": kind, "base_model": cfg.model}
