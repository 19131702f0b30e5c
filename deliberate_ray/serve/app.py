"""Ray Serve app where vLLM does not run: one FastAPI deployment whose replicas hold every
served model on the transformers engine, each model with its own `@serve.batch` queue.

A replica checks the API key and the request (every rejection an OpenAI-style 4xx) and routes
by the request's `model` field, so a base model and its trained variants answer side by side.
Keeping the models in the ingress replica saves a Ray hop per request, which is most of the
serving overhead for small models on a few cores; replicas scale with `serve.autoscaling`.
(Where vLLM runs, `ray.serve.llm` deploys and scales each model on its own: serve/vllm.py.)
"""

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from deliberate_ray.config import ServeConfig
from deliberate_ray.engines.hf import GenRequest, GenResult, HFGenerator
from deliberate_ray.engines.rows import split_prefill
from deliberate_ray.serve.protocol import (
    APIError,
    ChatRequest,
    check_api_key,
    completion_response,
    models_response,
    parse_chat_request,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20

api = FastAPI(title="deliberate-ray", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = f"{request.method} {request.url.path}: {exc.detail}"
    err = APIError(exc.status_code, message, code=codes.get(exc.status_code))
    return JSONResponse(err.body(), status_code=exc.status_code)


@api.exception_handler(Exception)
async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    err = APIError(500, f"internal error: {type(exc).__name__}", type_="server_error")
    return JSONResponse(err.body(), status_code=500)


class ChatModel:
    """One model on the transformers engine; concurrent requests share forward passes."""

    def __init__(self, name: str, ref: str, cfg: ServeConfig):
        self.name = name
        device = "cuda" if cfg.num_gpus > 0 else "cpu"
        self.engine = HFGenerator(
            ref, device=device, dtype=cfg.dtype, torch_threads=cfg.torch_threads
        )
        # serve.batch keeps one queue per decorated function, so each model decorates its own.
        self.generate = serve.batch(
            max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s
        )(self._generate)

    async def _generate(self, requests: list[GenRequest]) -> list[GenResult]:
        # The forward passes run in a thread so the replica keeps accepting requests.
        return await asyncio.to_thread(self.engine.generate, requests)

    async def chat(self, req: ChatRequest, max_tokens: int) -> dict[str, Any]:
        messages, prefill = split_prefill([m.model_dump() for m in req.messages])
        base = GenRequest(
            messages=messages,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
            stop=req.stop,
            prefill=prefill,
        )
        prompt_tokens = self._prompt_tokens(base)
        limit = self.engine.max_positions
        if limit and prompt_tokens + max_tokens > limit:
            raise APIError(
                400,
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) "
                f"exceeds the context of model {self.name!r} ({limit} tokens)",
                param="messages",
                code="context_length_exceeded",
            )
        samples = [
            replace(base, seed=None if req.seed is None else req.seed + i) for i in range(req.n)
        ]
        results: list[GenResult] = await asyncio.gather(*(self.generate(s) for s in samples))
        return completion_response(
            self.name,
            [(r.generated_text, r.finish_reason) for r in results],
            prompt_tokens,
            sum(r.num_generated_tokens for r in results),
        )

    def _prompt_tokens(self, req: GenRequest) -> int:
        text = self.engine.prompt_text(req)
        return len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])


@serve.deployment
@serve.ingress(api)
class OpenAIServer:
    """Auth, validation, routing by `model`, and the models themselves."""

    def __init__(self, models: dict[str, str], cfg: ServeConfig, key_sha256: str | None):
        self.models = {name: ChatModel(name, ref, cfg) for name, ref in models.items()}
        # Only the key's digest travels through Ray (deployment args are stored in the GCS).
        self.key_sha256 = key_sha256
        self.max_tokens_limit = cfg.max_tokens_limit
        self.default_max_tokens = cfg.default_max_tokens

    def _authorize(self, request: Request) -> None:
        check_api_key(request.headers.get("authorization", ""), self.key_sha256)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return models_response(self.models)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        self._authorize(request)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None
        req = parse_chat_request(body)
        if req.model not in self.models:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; served models: {sorted(self.models)}",
                param="model",
                code="model_not_found",
            )
        max_tokens = req.max_tokens or self.default_max_tokens
        if max_tokens > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens: {max_tokens} exceeds this server's limit of {self.max_tokens_limit}",
                param="max_tokens",
                code="max_tokens_exceeded",
            )
        return JSONResponse(await self.models[req.model].chat(req, max_tokens))


def build_hf_app(models: dict[str, str], cfg: ServeConfig, key_sha256: str | None) -> Any:
    scaling = cfg.autoscaling
    return OpenAIServer.options(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        autoscaling_config={
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        },
        # Room for one batch running and the next one filling, per model.
        max_ongoing_requests=2 * cfg.max_batch_size * len(models),
    ).bind(models, cfg, key_sha256)
