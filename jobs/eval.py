"""Entry point for `ray job submit`: evaluate served models (suites from the config's eval
section unless --suite is given).

ray job submit --working-dir . -- python jobs/eval.py --config configs/demo.yaml \
    --endpoint http://127.0.0.1:8000/v1 --model base --model cot --out runs/demo/eval
"""

import sys

from deliberate_ray.cli import app

if __name__ == "__main__":
    app(["eval", *sys.argv[1:]])
