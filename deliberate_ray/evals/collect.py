"""The answer source of an eval: an OpenAI-compatible endpoint, asked through the engine
layer's http engine (`ray.data.llm`'s HTTP processor: concurrent actors, retries with
backoff on 429/5xx and dropped connections), one row per (suite row, model) with the row's
model named in the row; the reasoning comes back in the row contract's `reasoning_text`.
"""

from __future__ import annotations

from typing import Any

import httpx
import pyarrow as pa

from deliberate_ray.config import EvalConfig
from deliberate_ray.engines import apply_engine
from deliberate_ray.engines.http import IO_CPUS, headers
from deliberate_ray.engines.rows import sampling_params


class EndpointError(RuntimeError):
    """The endpoint cannot be used: unreachable, refuses the key, or lacks a model."""


def base_url(endpoint: str) -> str:
    """Accept `http://host:port`, `.../v1` or `.../v1/chat/completions`; return `.../v1`."""
    url = endpoint.rstrip("/").removesuffix("/chat/completions").rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def check_endpoint(endpoint: str, models: list[str], cfg: EvalConfig) -> None:
    """Fail fast, before any Ray work, with what is wrong and what the server offers."""
    url = base_url(endpoint) + "/models"
    engine = cfg.endpoint_engine(base_url(endpoint), models[0])
    try:
        resp = httpx.get(url, headers=headers(engine), timeout=30)
    except httpx.HTTPError as e:
        raise EndpointError(f"cannot reach {url}: {e}") from None
    if resp.status_code == 401:
        raise EndpointError(
            f"{url} refused the API key (401); set eval.api_key_env / --api-key-env"
        )
    if resp.status_code != 200:
        raise EndpointError(f"{url} answered {resp.status_code}: {resp.text[:300]}")
    served = [m["id"] for m in resp.json().get("data", [])]
    missing = [m for m in models if m not in served]
    if missing:
        raise EndpointError(f"models {missing} are not served at {endpoint}; served: {served}")


def request_items(rows: list[dict[str, Any]], models: list[str], cfg: EvalConfig) -> list[dict]:
    """Engine-contract rows. Model by model: on a small machine each served model is an
    engine of its own, and one busy engine at a time batches its requests instead of the
    engines fighting for cores."""
    params = sampling_params(cfg.sampling(), seed=cfg.seed)
    return [
        {"key": i, "model": model, "messages": row["messages"], "sampling_params": params}
        for model in models
        for i, row in enumerate(rows)
    ]


def _replies(batch: pa.Table) -> pa.Table:
    """Engine outputs -> the eval's reply columns (strings, never None, so that no column is
    all-null: Ray Data would type it as float). A reply with reasoning and no answer after
    it keeps its reasoning; the grader stage counts it as "no answer"."""
    col = batch.column
    return pa.table(
        {
            "key": col("key"),
            "model": col("model"),
            "content": pa.array([t or "" for t in col("generated_text").to_pylist()]),
            "reasoning": pa.array([t or "" for t in col("reasoning_text").to_pylist()]),
            "finish_reason": col("finish_reason"),
            "prompt_tokens": col("num_input_tokens"),
            "completion_tokens": col("num_generated_tokens"),
            "error": pa.array([e or "" for e in col("engine_error").to_pylist()], pa.string()),
        },
    )


def collect(items: list[dict[str, Any]], endpoint: str, cfg: EvalConfig) -> Any:
    """Lazy Dataset of replies, one row per request item."""
    import ray.data

    engine = cfg.endpoint_engine(base_url(endpoint), items[0]["model"])
    ds = apply_engine(ray.data.from_items(items), engine, keep=["key", "model"])
    return ds.map_batches(_replies, batch_format="pyarrow", num_cpus=IO_CPUS)
