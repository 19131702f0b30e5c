"""Step 4 of the method: SFT on the tuples (or documents) with Ray Train, then an HF export."""

from deliberate_ray.train.run import run_train

__all__ = ["run_train"]
