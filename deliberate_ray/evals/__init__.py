"""Evals: suites (what to ask), endpoints (how answers come), graders (how they are scored)."""

from deliberate_ray.evals.run import run_eval

__all__ = ["run_eval"]
