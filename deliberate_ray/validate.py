"""`deliberate-ray validate`: check a config and every file it names, report all problems.

Runs without Ray so it is instant: the same row checks as the prompt loader, applied
in-process, so a config that validates is one the stages accept.
"""

from __future__ import annotations

import json
from pathlib import Path

from deliberate_ray.config import Config, ConfigError, EngineConfig, load_config
from deliberate_ray.models import EMBEDDED, TINY, ModelRefError, embedded_gguf_path
from deliberate_ray.prompts import PromptSourceError, RowRules, check_record
from deliberate_ray.records import iter_records
from deliberate_ray.spec import Spec, load_spec

MAX_ROW_ERRORS = 20


def check_prompt_source(uri: str, rules: RowRules, field: str) -> list[str]:
    try:
        if "://" not in uri and not Path(uri).exists():
            return [f"{field}: bad value {uri!r} -> file not found"]
        records = iter_records(uri)
    except PromptSourceError as e:
        return [f"{field}: {e}"]
    except Exception as e:  # unreadable file: report, don't crash
        return [f"{field}: cannot read {uri!r}: {e}"]
    errors = []
    for n, rec in records:
        if isinstance(rec, json.JSONDecodeError):
            errors.append(f"{uri}:{n}: invalid_json ({rec.msg})")
            continue
        err = check_record(rec, uri, rules)["error"]
        if err:
            errors.append(f"{uri}:{n}: {err}")
    if len(errors) > MAX_ROW_ERRORS:
        errors = errors[:MAX_ROW_ERRORS] + [f"{uri}: ... and {len(errors) - MAX_ROW_ERRORS} more"]
    if not records:
        errors.append(f"{field}: {uri!r} holds no rows")
    return errors


def check_engine(engine: EngineConfig, field: str) -> list[str]:
    if engine.model == EMBEDDED:
        try:
            embedded_gguf_path()
        except ModelRefError as e:
            return [f"{field}.model: bad value {engine.model!r} -> {e}"]
    elif engine.model != TINY and engine.model.startswith(("/", ".", "~")):
        if not (Path(engine.model).expanduser() / "config.json").exists():
            return [f"{field}.model: bad value {engine.model!r} -> no HF model (config.json) there"]
    return []


def check_config(cfg: Config) -> list[str]:
    errors: list[str] = []
    spec: Spec | None = None
    try:
        spec = load_spec(cfg.spec.path)
    except ConfigError as e:
        errors += [f"spec.path ({cfg.spec.path}): {line}" for line in e.errors]
    rules = RowRules(tuple(spec.category_ids) if spec else None, cfg.prompts.max_chars)
    for i, uri in enumerate(cfg.prompts.sources):
        errors += check_prompt_source(uri, rules, f"prompts.sources.{i}")
    if cfg.generate is not None:
        errors += check_engine(cfg.generate.teacher.engine, "generate.teacher.engine")
        if cfg.generate.judge.llm.enabled:
            errors += check_engine(cfg.generate.judge.llm.engine, "generate.judge.llm.engine")
    if cfg.eval is not None:
        for i, uri in enumerate(cfg.eval.suites):
            if "://" not in uri and not Path(uri).exists():
                errors.append(f"eval.suites.{i}: bad value {uri!r} -> file not found")
    return errors


def validate_file(path: str) -> list[str]:
    """All problems with a config file and the files it names; empty when valid."""
    try:
        cfg = load_config(path)
    except ConfigError as e:
        return e.errors
    return check_config(cfg)
