"""The generate stage: spec-in-context CoT from a teacher, judged, best-of-n, spec stripped."""

from deliberate_ray.generate.run import output_dir, run_generate

__all__ = ["output_dir", "run_generate"]
