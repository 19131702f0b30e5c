"""The answer source of an eval: an OpenAI-compatible endpoint, asked through Ray Data.

One request per (suite row, model), sent by `ray.data.llm`'s HTTP processor (concurrent
actors, retries with backoff on 429/5xx and dropped connections) with the request body and
response parsing of the `http` engine, plus the reply's reasoning (the CoT).
"""

from __future__ import annotations

import functools
from typing import Any

import httpx

from deliberate_ray.config import EngineConfig, EvalConfig
from deliberate_ray.engines.http import headers, payload, processor_config, response_output
from deliberate_ray.engines.rows import to_py
from deliberate_ray.serve.protocol import THINK_CLOSE, THINK_OPEN, split_reasoning

# HTTP stages wait on the network: many share one core, and they must leave CPUs free
# for the Serve replicas on the same (small) cluster.
IO_CPUS = 0.05


class EndpointError(RuntimeError):
    """The endpoint cannot be used: unreachable, refuses the key, or lacks a model."""


def base_url(endpoint: str) -> str:
    """Accept `http://host:port`, `.../v1` or `.../v1/chat/completions`; return `.../v1`."""
    url = endpoint.rstrip("/").removesuffix("/chat/completions").rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def engine_config(endpoint: str, model: str, cfg: EvalConfig) -> EngineConfig:
    return EngineConfig(
        kind="http",
        model=model,
        base_url=base_url(endpoint),
        api_key_env=cfg.api_key_env,
        max_retries=cfg.max_retries,
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        timeout_s=cfg.timeout_s,
    )


def check_endpoint(endpoint: str, models: list[str], cfg: EvalConfig) -> None:
    """Fail fast, before any Ray work, with what is wrong and what the server offers."""
    url = base_url(endpoint) + "/models"
    try:
        resp = httpx.get(url, headers=headers(engine_config(endpoint, models[0], cfg)), timeout=30)
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
    params = {
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "stop": [],
        "seed": cfg.seed,
    }
    # Model by model: on a small machine each served model is an engine of its own, and one
    # busy engine at a time batches its requests instead of the engines fighting for cores.
    return [
        {"key": i, "model": model, "messages": row["messages"], "sampling_params": params}
        for model in models
        for i, row in enumerate(rows)
    ]


def _preprocess(row: dict[str, Any], engine: EngineConfig) -> dict[str, Any]:
    return row | {"payload": payload(row, engine) | {"model": row["model"]}}


def reply_parts(message: dict[str, Any], content: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a reply. The CoT is in `reasoning` (vLLM >= 0.10) or
    `reasoning_content` (older vLLM, our transformers app); a `<think>` block still in the
    content is split here: a server without a reasoning parser, or a CoT cut off before
    `</think>` (vLLM's olmo3 parser then returns all of it as content)."""
    reasoning = message.get("reasoning") or message.get("reasoning_content")
    if not reasoning and (THINK_OPEN in content or THINK_CLOSE in content):
        return split_reasoning(content)
    return reasoning or None, content


def _postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """Strings, never None, so no column is all-null (Ray Data would type it as float)."""
    response = to_py(row["http_response"])
    out = response_output(response, int(row["sampling_params"]["max_tokens"]))
    message = (response.get("choices") or [{}])[0].get("message") or {}
    error = out["engine_error"] or ""
    reasoning, content = reply_parts(message, out["generated_text"])
    # A reply with reasoning but no answer after it (a CoT cut off by max_tokens) keeps its
    # reasoning; the grader stage counts it as "no answer", never as a refusal.
    return {
        "key": int(row["key"]),
        "model": row["model"],
        "content": content,
        "reasoning": reasoning or "",
        "finish_reason": out["finish_reason"],
        "prompt_tokens": out["num_input_tokens"],
        "completion_tokens": out["num_generated_tokens"],
        "error": error,
    }


def collect(items: list[dict[str, Any]], endpoint: str, cfg: EvalConfig) -> Any:
    """Lazy Dataset of replies, one row per request item."""
    import ray.data
    from ray.data.llm import build_processor

    engine = engine_config(endpoint, items[0]["model"], cfg)
    config = processor_config(engine).model_copy(
        update={"http_request_stage": {"num_cpus": IO_CPUS}}
    )
    processor = build_processor(
        config,
        preprocess=functools.partial(_preprocess, engine=engine),
        postprocess=_postprocess,
        preprocess_map_kwargs={"num_cpus": IO_CPUS},
        postprocess_map_kwargs={"num_cpus": IO_CPUS},
    )
    return processor(ray.data.from_items(items))
