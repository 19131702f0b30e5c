# The two commands a fresh machine needs: `make demo` (the main job on the embedded
# default) and `make test`. Both create/update .venv themselves (idempotent).
PY := .venv/bin/python
export DELIBERATE_RAY_CACHE ?= $(CURDIR)/.cache/deliberate-ray

.PHONY: setup demo test test-all lint clean-runs

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m deliberate_ray.cli pipeline --config configs/demo.yaml

test: setup
	$(PY) -m ruff check deliberate_ray jobs tests bench
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check deliberate_ray jobs tests bench
	$(PY) -m ruff format --check deliberate_ray jobs tests bench

clean-runs:
	rm -rf runs
