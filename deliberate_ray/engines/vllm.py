"""vLLM on GPUs through `ray.data.llm` (chat template, tokenize, engine, detokenize stages).

vLLM itself is imported only inside the engine actors, so building (and checking) the
processor works on machines without it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from deliberate_ray.config import EngineConfig
from deliberate_ray.engines.rows import SKIPPED, error_output, finish_reason, with_outputs
from deliberate_ray.models import resolve_model


def processor_config(cfg: EngineConfig) -> Any:
    """The `vLLMEngineProcessorConfig` for an engine section (tensor parallelism etc. go in
    `engine_kwargs`); failed rows come back with an error instead of failing the run."""
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=resolve_model(cfg.model),
        engine_kwargs=dict(cfg.engine_kwargs),
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        accelerator_type=cfg.accelerator_type,
        should_continue_on_error=True,
    )


def build(cfg: EngineConfig) -> Any:
    from ray.data.llm import build_processor

    builder_kwargs = {"chat_template_kwargs": cfg.chat_template_kwargs}
    return build_processor(processor_config(cfg), builder_kwargs=builder_kwargs)


def _one_token(batch: pa.Table) -> pa.Table:
    """vLLM needs max_tokens >= 1: skipped rows get 1 and are blanked afterwards."""
    params = batch.column("sampling_params").to_pylist()
    skipped = [p["max_tokens"] == 0 for p in params]
    params = [p | {"max_tokens": 1} if s else p for p, s in zip(params, skipped, strict=True)]
    i = batch.schema.get_field_index("sampling_params")
    batch = batch.set_column(i, "sampling_params", pa.array(params, batch.schema.field(i).type))
    return batch.append_column("_skipped", pa.array(skipped, pa.bool_()))


def _outputs(batch: pa.Table, keep: list[str]) -> pa.Table:
    rows = batch.to_pylist()
    outputs = []
    for r in rows:
        error = r.get("__inference_error__")
        if r["_skipped"]:
            outputs.append(SKIPPED)
        elif error:
            outputs.append(error_output(str(error)))
        else:
            max_tokens = r["sampling_params"]["max_tokens"]
            outputs.append(
                {
                    "generated_text": r["generated_text"],
                    "num_input_tokens": r["num_input_tokens"],
                    "num_generated_tokens": r["num_generated_tokens"],
                    "finish_reason": finish_reason(r["num_generated_tokens"], max_tokens),
                    "engine_error": None,
                }
            )
    return with_outputs(batch, keep, outputs)


def apply_vllm(ds: Any, cfg: EngineConfig, keep: list[str]) -> Any:
    ds = ds.map_batches(_one_token, batch_format="pyarrow")
    return build(cfg)(ds).map_batches(_outputs, fn_kwargs={"keep": keep}, batch_format="pyarrow")
