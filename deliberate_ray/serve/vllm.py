"""GPU serving through `ray.serve.llm` (vLLM): one `LLMConfig` per model, `build_openai_app`.

Imported only when chosen: `ray.serve.llm` needs vLLM, which comes with the `gpu` extra.
To split `<think>` blocks into `reasoning_content` as the CPU app does, add vLLM's
`reasoning_parser` (e.g. `deepseek_r1`) to `serve.engine_kwargs`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from deliberate_ray.config import ServeConfig
from deliberate_ray.models import resolve_model

INSTALL_HINT = "the vLLM engine needs the gpu extra: pip install 'deliberate-ray[gpu]'"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def build_vllm_app(models: dict[str, str], cfg: ServeConfig) -> Any:
    try:
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError as e:
        raise RuntimeError(f"{INSTALL_HINT} ({e})") from None
    scaling = cfg.autoscaling
    configs = [
        LLMConfig(
            model_loading_config={"model_id": name, "model_source": resolve_model(ref)},
            deployment_config={
                "autoscaling_config": {
                    "min_replicas": scaling.min_replicas,
                    "max_replicas": scaling.max_replicas,
                    "target_ongoing_requests": scaling.target_ongoing_requests,
                }
            },
            accelerator_type=cfg.accelerator_type,
            engine_kwargs=cfg.engine_kwargs,
        )
        for name, ref in models.items()
    ]
    return build_openai_app({"llm_configs": configs})
