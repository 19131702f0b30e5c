"""Entry point for `ray job submit`: the generate stage on the cluster.

ray job submit --working-dir . -- python jobs/generate.py --config configs/generate-cluster.yaml
"""

import sys

from deliberate_ray.cli import app

if __name__ == "__main__":
    app(["generate", *sys.argv[1:]])
