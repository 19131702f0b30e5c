"""Entry point for `ray job submit`: serve models on the cluster until the job is stopped.

ray job submit --working-dir . -- python jobs/serve.py --config configs/demo.yaml \
    --model base=embedded:smollm2-135m-instruct --model cot=runs/demo/train/cot/export
(`--host 0.0.0.0` to accept requests from outside the head node.)
"""

import sys

from deliberate_ray.cli import app

if __name__ == "__main__":
    app(["serve", *sys.argv[1:]])
