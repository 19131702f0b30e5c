"""Ray Serve app for CPU (and GPU without vLLM): a FastAPI ingress in front of one deployment
per model, each running the transformers engine with requests batched by `@serve.batch`.

The ingress checks the API key and the request (every rejection an OpenAI-style 4xx), then
routes by the request's `model` field, so a base model and its trained variants are served
side by side and scale independently.
"""

import asyncio
import hashlib
import hmac
import json
import logging
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
    log.exception("chat request failed")
    err = APIError(500, f"internal error: {type(exc).__name__}", type_="server_error")
    return JSONResponse(err.body(), status_code=500)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Auth, validation and routing; holds no model."""

    def __init__(
        self,
        models: dict[str, Any],
        key_sha256: str | None,
        max_tokens_limit: int,
        default_max_tokens: int,
    ):
        self.models = models  # name -> DeploymentHandle of a ChatModel
        # Only the key's digest travels through Ray (deployment args are stored in the GCS).
        self.key_sha256 = key_sha256
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = default_max_tokens

    def _authorize(self, request: Request) -> None:
        if self.key_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key_digest(token.strip()), self.key_sha256
        ):
            raise APIError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

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
        payload = req.model_dump() | {"max_tokens": max_tokens}
        result = await self.models[req.model].chat.remote(payload)
        if "error" in result:
            return JSONResponse({"error": result["error"]}, status_code=result["status"])
        return JSONResponse(result)


@serve.deployment
class ChatModel:
    """One model on the transformers engine; concurrent requests share forward passes."""

    def __init__(
        self,
        name: str,
        ref: str,
        device: str,
        dtype: str,
        torch_threads: int | None,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ):
        self.name = name
        self.engine = HFGenerator(ref, device=device, dtype=dtype, torch_threads=torch_threads)
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A validated request body -> an OpenAI response, or {"status", "error"}."""
        messages, prefill = split_prefill(body["messages"])
        base = GenRequest(
            messages=messages,
            max_tokens=body["max_tokens"],
            temperature=body["temperature"],
            top_p=body["top_p"],
            stop=body["stop"],
            prefill=prefill,
        )
        prompt_tokens = self._prompt_tokens(base)
        limit = self.engine.max_positions
        if limit and prompt_tokens + base.max_tokens > limit:
            err = APIError(
                400,
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({base.max_tokens}) "
                f"exceeds the context of model {self.name!r} ({limit} tokens)",
                param="messages",
                code="context_length_exceeded",
            )
            return {"status": 400} | err.body()
        seed = body["seed"]
        samples = [
            GenRequest(**(vars(base) | {"seed": None if seed is None else seed + i}))
            for i in range(body["n"])
        ]
        results: list[GenResult] = await asyncio.gather(*(self.generate_batch(s) for s in samples))
        return completion_response(
            self.name,
            [(r.generated_text, r.finish_reason) for r in results],
            prompt_tokens,
            sum(r.num_generated_tokens for r in results),
        )

    def _prompt_tokens(self, req: GenRequest) -> int:
        text = self.engine.prompt_text(req)
        return len(self.engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def generate_batch(self, requests: list[GenRequest]) -> list[GenResult]:
        # The forward passes run in a thread so the replica keeps accepting requests.
        return await asyncio.to_thread(self.engine.generate, requests)


def build_hf_app(models: dict[str, str], cfg: ServeConfig, key_sha256: str | None) -> Any:
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    scaling = cfg.autoscaling
    handles = {
        name: ChatModel.options(
            name=f"model-{name}",
            ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
            autoscaling_config={
                "min_replicas": scaling.min_replicas,
                "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
            },
            # Room for one batch running and the next one filling.
            max_ongoing_requests=2 * cfg.max_batch_size,
        ).bind(
            name,
            ref,
            device,
            cfg.dtype,
            cfg.torch_threads,
            cfg.max_batch_size,
            cfg.batch_wait_timeout_s,
        )
        for name, ref in models.items()
    }
    return Ingress.bind(handles, key_sha256, cfg.max_tokens_limit, cfg.default_max_tokens)
