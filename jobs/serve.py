"""Entry point for `ray job submit`: serve models on the cluster until the job is stopped.

ray job submit --working-dir . -- python jobs/serve.py --config configs/demo.yaml \
    --model base=embedded:smollm2-135m-instruct --model cot=runs/demo/train/cot/export
(`--host 0.0.0.0` to accept requests from outside the head node.) The API key comes from
$DELIBERATE_RAY_API_KEY on the node (or the variable `--api-key-env` names); without it the job
exits 2, unless `--no-auth`.
"""

import sys

from deliberate_ray.cli import app

if __name__ == "__main__":
    app(["serve", *sys.argv[1:]])
