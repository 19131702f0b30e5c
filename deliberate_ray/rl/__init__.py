"""The RL stage after SFT (docs/rl.md): GRPO on Ray with the spec-aware judge as reward and
the CoT hidden from it."""

from deliberate_ray.rl.run import run_rl

__all__ = ["run_rl"]
