"""OpenAI-compatible serving on Ray Serve: `ray.serve.llm` (vLLM) wherever vLLM runs, else
transformers."""

from deliberate_ray.serve.launch import shutdown, start_serve

__all__ = ["shutdown", "start_serve"]
