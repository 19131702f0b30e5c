"""Eval suites: JSONL files of prompts with the expected behaviour, validated on load.

Rows: `id`, `prompt` or `messages`, `expected` (comply | refuse | safe_complete), optional
`category`, `tags` and `eval_only` (true: the row must never become a training prompt;
generate refuses such prompts, see evals/public.py). Jailbreak suites add `template` (which
wrapper) and `base_id` (the wrapped prompt), which the worst-case-over-templates metric
groups by. Agentic suites add `harm`: the harmful action a scenario offers, which the
`agentic` scorer looks for in the reply (graders/agentic.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from deliberate_ray.config import ACTIONS, ConfigError
from deliberate_ray.prompts import _as_messages
from deliberate_ray.records import iter_records
from deliberate_ray.spec import fold

UNCATEGORISED = "uncategorised"
MAX_ERRORS = 20


def load_suite(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Validated rows of one suite; raises ConfigError listing every bad line.

    `limit` keeps `limit` evenly spaced prompts (for jailbreak suites: base prompts, with all
    their templates), so a quick run still spans the categories of a suite sorted by them
    and still measures the worst case over templates.
    """
    uri = str(path)
    if "://" not in uri and not Path(uri).exists():
        raise ConfigError(uri, ["suite file not found"])
    name = Path(uri.split("://")[-1]).stem
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    seen: set[str] = set()
    try:
        records = iter_records(uri)
    except UnicodeDecodeError as e:
        raise ConfigError(uri, [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except (OSError, ValueError) as e:
        raise ConfigError(uri, [f"cannot be read: {e}"]) from None
    for n, rec in records:
        if isinstance(rec, json.JSONDecodeError):
            errors.append(f"line {n}: invalid JSON ({rec.msg})")
            continue
        row, err = _check_row(rec)
        if err is None and row["id"] in seen:
            err = f"duplicate id {row['id']!r}"
        if err:
            errors.append(f"line {n}: {err}")
            continue
        seen.add(row["id"])
        rows.append(row | {"suite": name})
    if errors:
        more = [f"... and {len(errors) - MAX_ERRORS} more"] if len(errors) > MAX_ERRORS else []
        raise ConfigError(uri, errors[:MAX_ERRORS] + more)
    if not rows:
        raise ConfigError(uri, ["the suite holds no rows"])
    if any(r["rubric"] for r in rows):
        from deliberate_ray.graders.rubric import load_rubric, rubric_path

        try:
            load_rubric(uri)
        except (OSError, ValueError) as e:
            raise ConfigError(uri, [f"rows name a rubric, but {rubric_path(uri)}: {e}"]) from None
    if limit is not None:
        bases = list(dict.fromkeys(r["base_id"] or r["id"] for r in rows))
        step = max(1.0, len(bases) / limit)
        keep = {bases[int(i * step)] for i in range(min(limit, len(bases)))}
        rows = [r for r in rows if (r["base_id"] or r["id"]) in keep]
    return rows


def _check_row(rec: Any) -> tuple[dict[str, Any], str | None]:
    if not isinstance(rec, dict):
        return {}, f"expected a JSON object, got {type(rec).__name__}"
    row_id = rec.get("id")
    if not isinstance(row_id, str) or not row_id:
        return {}, "id: expected a non-empty string"
    messages, err = _as_messages(rec)
    if err:
        return {}, f"id {row_id!r}: {err}"
    expected = rec.get("expected")
    if expected not in ACTIONS:
        return {}, f"id {row_id!r}: expected: bad value {expected!r} -> allowed: {list(ACTIONS)}"
    category = rec.get("category", UNCATEGORISED)
    tags = rec.get("tags", [])
    if not isinstance(category, str) or not category:
        return {}, f"id {row_id!r}: category: expected a non-empty string"
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return {}, f"id {row_id!r}: tags: expected a list of strings"
    if not isinstance(rec.get("eval_only", False), bool):
        return {}, f"id {row_id!r}: eval_only: expected true or false"
    optional = {k: rec.get(k) for k in ("template", "base_id", "rubric")}
    if any(v is not None and not isinstance(v, str) for v in optional.values()):
        return {}, f"id {row_id!r}: template, base_id and rubric must be strings"
    harm = rec.get("harm")
    if harm is not None:
        from deliberate_ray.graders.agentic import check_harm

        if err := check_harm(harm):
            return {}, f"id {row_id!r}: {err}"
    return {
        "id": row_id,
        "messages": messages,
        "expected": expected,
        "category": category,
        "tags": tags,
        **optional,
        "harm": harm,
    }, None


def load_templates(path: str | Path) -> list[dict[str, str]]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    templates = data["templates"]
    for t in templates:
        if "{prompt}" not in t["text"]:
            raise ConfigError(str(path), [f"template {t['id']!r} has no {{prompt}} slot"])
    return templates


def jailbreak_rows(source: list[dict[str, Any]], templates: list[dict[str, str]]) -> list[dict]:
    """Every expected-refuse prompt of `source` (raw JSONL records) inside every template."""
    out = []
    for rec in source:
        if rec["expected"] != "refuse":
            continue
        for t in templates:
            out.append(
                {
                    "id": f"jb-{rec['id']}-{t['id']}",
                    "base_id": rec["id"],
                    "template": t["id"],
                    "prompt": fold(t["text"]).replace("{prompt}", rec["prompt"]),
                    "expected": "refuse",
                    "category": rec["category"],
                    "tags": ["jailbreak", t["id"]],
                    "eval_only": True,
                }
            )
    return out
