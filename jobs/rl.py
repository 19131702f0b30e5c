"""Entry point for `ray job submit`: the RL stage (GRPO after SFT) on the cluster.

ray job submit --working-dir . -- python jobs/rl.py --config configs/cluster-rl.yaml
"""

import sys

from deliberate_ray.cli import app

if __name__ == "__main__":
    app(["rl", *sys.argv[1:]])
