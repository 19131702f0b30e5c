"""Entry point for `ray job submit`: the train stage on the cluster.

ray job submit --working-dir . -- python jobs/train.py --config configs/train-cluster.yaml
"""

import sys

from deliberate_ray.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
