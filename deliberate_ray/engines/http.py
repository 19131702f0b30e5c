"""Any OpenAI-compatible chat endpoint through `ray.data.llm.HttpRequestProcessorConfig`.

The API key comes from the environment variable named by `api_key_env` (never from the
config file). It reaches the HTTP actors through Ray's object store (`key_ref`): their
constructor arguments hold only a reference, so the key is in no actor argument, runtime
env or log; each actor's session sends it as its default Authorization header.

A prefilled assistant turn is sent with vLLM's `continue_final_message` extension, so
prefill needs a vLLM-style server (our Serve app or `vllm serve`).

Ray Data stores the payloads as an Arrow struct, which gives every row every key (null where
a row has none); the session drops those nulls, so a hosted API never sees a key it would
reject.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import pyarrow as pa

from deliberate_ray.config import EngineConfig
from deliberate_ray.engines.rows import SKIPPED, error_output, finish_reason, to_py, with_outputs
from deliberate_ray.serve.protocol import THINK_CLOSE, THINK_OPEN, split_reasoning

# Logical CPUs of each HTTP stage (they wait on the network).
IO_CPUS = 0.05


def chat_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def api_key(cfg: EngineConfig) -> str | None:
    """The key `api_key_env` names (None without one); an unset variable is an error."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ValueError(
            f"engine.api_key_env names {cfg.api_key_env!r}, but that environment variable "
            "is not set (export it before the run)"
        )
    return key


def headers(cfg: EngineConfig) -> dict[str, str]:
    """The Authorization header for requests the driver itself sends (the endpoint check)."""
    key = api_key(cfg)
    return {"Authorization": f"Bearer {key}"} if key else {}


# The driver keeps each key's object alive while its runs use it.
_KEY_REFS: dict[str, Any] = {}


def key_ref(cfg: EngineConfig) -> Any:
    """The key as an object-store reference for the HTTP actors (None without a key)."""
    key = api_key(cfg)
    if key is None:
        return None
    import ray

    if not ray.is_initialized():
        ray.init()
    _KEY_REFS[cfg.api_key_env] = ref = ray.put(key)  # type: ignore[index]
    return ref


def processor_config(cfg: EngineConfig) -> Any:
    from ray.data.llm import HttpRequestProcessorConfig

    assert cfg.base_url is not None  # EngineConfig validates it for kind http
    return HttpRequestProcessorConfig(
        url=chat_url(cfg.base_url),
        headers={},  # the key travels by reference (key_ref), not as an actor argument
        qps=cfg.qps,
        # The session retries (NullDroppingSession._send): Ray's stage would raise once its
        # retries ran out, failing the whole dataset, and it never retries a 500.
        max_retries=0,
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        session_factory=functools.partial(
            NullDroppingSession, cfg.timeout_s, key_ref(cfg), cfg.max_retries
        ),
    )


# Worth another try: a server (or a Serve replica) that died, restarted or is overloaded.
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRY_WAIT_S = 1.0  # doubled after each try


class NullDroppingSession:
    """An aiohttp session whose `post` drops top-level null fields from the JSON body and
    starts the request at once, and retries it.

    Ray's HTTP stage creates every request of a batch, then awaits them one after another;
    a plain aiohttp `post` only starts when awaited, so a batch would go out one request at
    a time and the server could never batch them. Here `post` returns a running task, so a
    batch of n rows is n requests in flight together.

    Each request is tried up to 1 + `retries` times, with 1, 2, 4, ... s between tries, on a
    connection error, a timeout or a status in RETRY_STATUS. A 500 is among them: a Serve
    replica that dies mid-request answers 500, and the retry reaches its replacement. What
    still fails is returned as a 500 with the error in its body: the row becomes an engine
    error (a counted failure), never an exception that ends the run."""

    def __init__(self, timeout_s: float, key: Any = None, retries: int = 0):
        import aiohttp

        headers = None
        if key is not None:  # an object-store reference to the API key (key_ref)
            import ray

            headers = {"Authorization": f"Bearer {ray.get(key)}"}
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s), headers=headers
        )
        self.retries = retries

    async def __aenter__(self) -> NullDroppingSession:
        await self.session.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.session.__aexit__(*exc)

    def post(self, url: str, *, data: str, **kwargs: Any) -> Any:
        import asyncio

        body = {k: v for k, v in json.loads(data).items() if v is not None}
        return asyncio.ensure_future(self._send(url, json.dumps(body), kwargs))

    async def _send(self, url: str, data: str, kwargs: dict[str, Any]) -> ReadResponse:
        import asyncio

        import aiohttp

        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(RETRY_WAIT_S * 2 ** (attempt - 1))
            try:
                async with self.session.post(url, data=data, **kwargs) as response:
                    body = await response.read()
                    if response.status not in RETRY_STATUS:
                        return ReadResponse(response.status, response.reason, body)
                    failure = f"HTTP {response.status}: {body[:300].decode(errors='replace')}"
            except (TimeoutError, aiohttp.ClientError) as e:
                failure = f"{type(e).__name__}: {e}"
        error = {"message": f"failed after {self.retries + 1} tries; last: {failure}"}
        return ReadResponse(500, "failed", json.dumps({"error": error}).encode())


class ReadResponse:
    """A response already read, usable as `async with (await task) as response`."""

    def __init__(self, status: int, reason: str | None, body: bytes):
        self.status, self.reason, self.body = status, reason, body

    async def __aenter__(self) -> ReadResponse:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def json(self) -> Any:
        return json.loads(self.body)


def payload(row: dict[str, Any], cfg: EngineConfig) -> dict[str, Any]:
    """The chat-completions request body of one row (skipped rows ask for one token); a
    row's own `model` picks one of the endpoint's models, else the config's."""
    messages = to_py(row["messages"])
    sp = to_py(row["sampling_params"])
    body: dict[str, Any] = {
        "model": row.get("model") or cfg.model,
        "messages": messages,
        "max_tokens": max(sp["max_tokens"], 1),
        "temperature": sp["temperature"],
        "top_p": sp["top_p"],
        "stop": sp["stop"] or None,
        "seed": sp["seed"],
    }
    if sp.get("repetition_penalty", 1.0) not in (None, 1.0):
        body["repetition_penalty"] = sp["repetition_penalty"]  # vLLM-style servers, ours
    if sp.get("logprobs"):
        body |= {"logprobs": True, "top_logprobs": sp["logprobs"]}
    if sp.get("regex"):
        body["structured_outputs"] = {"regex": sp["regex"]}  # vLLM-style servers
    if messages and messages[-1]["role"] == "assistant":
        body |= {"continue_final_message": True, "add_generation_prompt": False}
    if cfg.chat_template_kwargs:
        body["chat_template_kwargs"] = cfg.chat_template_kwargs
    return body


def _preprocess(row: dict[str, Any], cfg: EngineConfig) -> dict[str, Any]:
    return row | {"payload": payload(row, cfg)}


def reply_parts(message: dict[str, Any], content: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a reply. The CoT is in `reasoning` (vLLM >= 0.10) or
    `reasoning_content` (older vLLM, our transformers app); a `<think>` block still in the
    content is split here: a server without a reasoning parser, or a CoT cut off before
    `</think>` (vLLM's olmo3 parser then returns all of it as content)."""
    reasoning = message.get("reasoning") or message.get("reasoning_content")
    if not reasoning and (THINK_OPEN in content or THINK_CLOSE in content):
        return split_reasoning(content)
    return reasoning or None, content


def response_output(response: Any, max_tokens: int) -> dict[str, Any]:
    """An OpenAI chat-completions response (or an error body) -> engine outputs, with the
    reasoning the server returned apart from the answer in `reasoning_text`."""
    response = to_py(response)
    try:
        choice = response["choices"][0]
        message = choice["message"]
        reasoning, text = reply_parts(message, message["content"] or "")
        usage = response.get("usage") or {}
        generated = int(usage.get("completion_tokens") or 0)
        reason = choice.get("finish_reason") or finish_reason(generated, max_tokens)
    except (KeyError, IndexError, TypeError):
        return error_output("bad response: " + json.dumps(response, default=str)[:500])
    return {
        "generated_text": text,
        "num_input_tokens": int(usage.get("prompt_tokens") or 0),
        "num_generated_tokens": generated,
        "finish_reason": "length" if reason == "length" else "stop",
        "engine_error": None,
        "reasoning_text": reasoning,
        "top_logprobs": response_logprobs(choice),
    }


def response_logprobs(choice: dict[str, Any]) -> list[list[dict[str, Any]]] | None:
    """OpenAI `logprobs.content[i].top_logprobs` -> per token, [{token, logprob}]."""
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    return [
        [
            {"token": t["token"], "logprob": float(t["logprob"])}
            for t in pos.get("top_logprobs") or []
        ]
        for pos in content
    ]


def _outputs(batch: pa.Table, keep: list[str]) -> pa.Table:
    outputs = []
    for params, response in zip(
        batch.column("sampling_params").to_pylist(),
        batch.column("http_response").to_pylist(),
        strict=True,
    ):
        skip = params["max_tokens"] == 0
        outputs.append(SKIPPED if skip else response_output(response, params["max_tokens"]))
    return with_outputs(batch, keep, outputs)


def apply_http(ds: Any, cfg: EngineConfig, keep: list[str]) -> Any:
    """Each stage waits on the network, so each asks for a sliver of a CPU: many share one
    core and leave the CPUs to a Serve replica on the same small cluster."""
    from ray.data.llm import build_processor

    config = processor_config(cfg).model_copy(update={"http_request_stage": {"num_cpus": IO_CPUS}})
    light = {"num_cpus": IO_CPUS}
    processor = build_processor(
        config,
        preprocess=functools.partial(_preprocess, cfg=cfg),
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )
    return processor(ds).map_batches(
        _outputs, fn_kwargs={"keep": keep}, batch_format="pyarrow", **light
    )
