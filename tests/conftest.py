"""Shared fixtures: one local Ray for the whole session, small models, temp caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DELIBERATE_RAY_CACHE", str(ROOT / ".cache" / "deliberate-ray"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by all tests that need one (~8 s to start, once)."""
    import ray

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=512 * 1024**2,
        runtime_env={"env_vars": {"DELIBERATE_RAY_CACHE": os.environ["DELIBERATE_RAY_CACHE"]}},
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Path of the tiny random Llama (same tokenizer as the embedded model)."""
    from deliberate_ray.models import TINY, resolve_model

    return resolve_model(TINY)


@pytest.fixture(scope="session")
def spec():
    from deliberate_ray.spec import load_spec

    return load_spec(ROOT / "specs" / "default.yaml")
