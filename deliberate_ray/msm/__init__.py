"""Model Spec Midtraining: the spec-document stage (`docs`) whose corpus MSM arms midtrain
on before their SFT (docs/msm.md)."""

from deliberate_ray.msm.docs import run_docs

__all__ = ["run_docs"]
