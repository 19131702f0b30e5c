"""Entry point for `ray job submit`: the whole pipeline on the cluster.

ray job submit --working-dir . -- python jobs/pipeline.py --config configs/pipeline-cluster.yaml
"""

import sys

from deliberate_ray.cli import app

if __name__ == "__main__":
    app(["pipeline", *sys.argv[1:]])
