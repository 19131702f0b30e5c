"""Engines: one row contract (see `rows`), three back ends (docs/generate.md, "Engines").

`apply_engine(ds, cfg, keep)` takes a Dataset whose rows hold `messages` and
`sampling_params` and returns a lazy Dataset of the `keep` columns plus `generated_text`,
token counts, `finish_reason` and `engine_error`. `kind: auto` is resolved here (see
`select`): vLLM where it runs, else transformers.
"""

from __future__ import annotations

from typing import Any

from deliberate_ray.config import EngineConfig
from deliberate_ray.engines.select import resolve_engine


def apply_engine(ds: Any, cfg: EngineConfig, keep: list[str]) -> Any:
    cfg = resolve_engine(cfg)
    if cfg.kind == "hf":
        from deliberate_ray.engines.hf import apply_hf

        return apply_hf(ds, cfg, keep)
    if cfg.kind == "vllm":
        from deliberate_ray.engines.vllm import apply_vllm

        return apply_vllm(ds, cfg, keep)
    from deliberate_ray.engines.http import apply_http

    return apply_http(ds, cfg, keep)


__all__ = ["apply_engine", "resolve_engine"]
