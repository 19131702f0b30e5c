"""OpenAI-compatible serving on Ray Serve: transformers on CPU, `ray.serve.llm` on GPU."""

from deliberate_ray.serve.launch import shutdown, start_serve

__all__ = ["shutdown", "start_serve"]
