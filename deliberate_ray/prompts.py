"""Prompt sources (JSONL, Parquet, CSV; local or `s3://`-style URIs) -> a Ray Dataset of prompts.

Every input row ends either in the *prompt* contract or in the quarantine with its reason:
invalid JSON, missing text, wrong types, unknown category, bad ideal_action, oversized,
duplicate. Ids are deterministic (hash of source + content), so reruns can skip done work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from deliberate_ray.config import ACTIONS, PromptsConfig
from deliberate_ray.contracts import PROMPT, QUARANTINE, quarantine_row, stable_id, to_table

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FORMATS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".csv": "csv",
}
RAW = pa.schema([("raw", pa.string()), ("path", pa.string())])
CHECKED = pa.schema(list(PROMPT) + [("error", pa.string()), ("raw", pa.string())])


class PromptSourceError(ValueError):
    """A prompt source cannot be read at all (missing file, unknown format)."""


def source_format(uri: str) -> str:
    for ext, fmt in FORMATS.items():
        if uri.lower().endswith(ext):
            return fmt
    raise PromptSourceError(
        f"prompt source {uri!r}: unknown format; allowed endings: {sorted(FORMATS)}"
    )


def _check_exists(uri: str) -> None:
    if "://" in uri:
        return  # remote: let the reader report what it finds
    from pathlib import Path

    if not Path(uri).exists():
        raise PromptSourceError(f"prompt source {uri!r} does not exist")


def _rows_to_raw(batch: pa.Table, path: str) -> pa.Table:
    rows = batch.to_pylist()
    raw = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
    return pa.table({"raw": raw, "path": [path] * len(raw)}, schema=RAW)


def read_raw(uri: str) -> Any:
    """One source -> Dataset of `raw` JSON strings (so wrong types survive to be quarantined)."""
    import ray.data

    _check_exists(uri)
    fmt = source_format(uri)
    if fmt == "jsonl":
        ds = ray.data.read_text(uri, drop_empty_lines=True)
        return ds.map_batches(
            lambda b: pa.table({"raw": b["text"], "path": [uri] * b.num_rows}, schema=RAW),
            batch_format="pyarrow",
        )
    if fmt == "parquet":
        ds = ray.data.read_parquet(uri)
    else:  # csv: read every column as text; JSON-looking cells are decoded in validation
        import pyarrow.csv as pcsv

        ds = ray.data.read_csv(
            uri,
            convert_options=pcsv.ConvertOptions(
                strings_can_be_null=True, column_types=None, auto_dict_encode=False
            ),
        )
    return ds.map_batches(_rows_to_raw, fn_kwargs={"path": uri}, batch_format="pyarrow")


@dataclass(frozen=True)
class RowRules:
    categories: tuple[str, ...] | None
    max_chars: int


def _as_messages(rec: dict[str, Any]) -> tuple[list[dict[str, str]] | None, str | None]:
    """Return (messages, error)."""
    msgs = rec.get("messages")
    text = rec.get("prompt")
    if isinstance(msgs, str) and msgs.strip().startswith("["):  # CSV cell holding JSON
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            return None, "wrong_type:messages (not valid JSON)"
    if msgs is not None:
        if not isinstance(msgs, list) or not msgs:
            return None, "wrong_type:messages (expected a non-empty list of {role, content})"
        out = []
        for m in msgs:
            if not isinstance(m, dict) or set(m) - {"role", "content"}:
                return None, "wrong_type:messages (each item must be {role, content})"
            if m.get("role") not in ROLES:
                return None, f"wrong_type:messages (role {m.get('role')!r} not in {list(ROLES)})"
            if not isinstance(m.get("content"), str):
                return None, "wrong_type:messages (content must be a string)"
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "user":
            return None, "wrong_type:messages (the last message must be from the user)"
        if not any(m["content"].strip() for m in out if m["role"] == "user"):
            return None, "missing_text"
        return out, None
    if text is None:
        return None, "missing_text (no `prompt` or `messages` field)"
    if not isinstance(text, str):
        return None, f"wrong_type:prompt (expected a string, got {type(text).__name__})"
    if not text.strip():
        return None, "missing_text"
    return [{"role": "user", "content": text.strip()}], None


def check_record(rec: Any, path: str, rules: RowRules) -> dict[str, Any]:
    """One parsed input record -> a CHECKED row (prompt columns + `error`, null when valid)."""
    base: dict[str, Any] = {k: None for k in CHECKED.names}
    base["raw"] = json.dumps(rec, ensure_ascii=False, default=str)
    if not isinstance(rec, dict):
        return base | {"error": f"wrong_type:row (expected an object, got {type(rec).__name__})"}
    msgs, err = _as_messages(rec)
    if err:
        return base | {"error": err}
    category = rec.get("category")
    if not isinstance(category, str) or not category:
        return base | {"error": "wrong_type:category (expected a non-empty string)"}
    if rules.categories is not None and category not in rules.categories:
        return base | {"error": f"unknown_category:{category} (allowed: {list(rules.categories)})"}
    action = rec.get("ideal_action")
    if action is not None and action not in ACTIONS:
        return base | {"error": f"invalid_ideal_action:{action!r} (allowed: {list(ACTIONS)})"}
    source = rec.get("source") or path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    if not isinstance(source, str):
        return base | {"error": "wrong_type:source (expected a string)"}
    size = sum(len(m["content"]) for m in msgs)
    if size > rules.max_chars:
        return base | {"error": f"oversized ({size} chars > max_chars {rules.max_chars})"}
    given = rec.get("id")
    if given is not None and not isinstance(given, str | int):
        return base | {"error": "wrong_type:id (expected a string)"}
    row_id = str(given) if given is not None else stable_id(source, msgs)
    return base | {
        "id": row_id,
        "messages": msgs,
        "category": category,
        "ideal_action": action,
        "source": source,
    }


def check_batch(batch: pa.Table, rules: RowRules) -> pa.Table:
    out = []
    for raw, path in zip(
        batch.column("raw").to_pylist(), batch.column("path").to_pylist(), strict=True
    ):
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            row = {k: None for k in CHECKED.names} | {
                "raw": raw,
                "error": f"invalid_json ({e.msg})",
            }
            out.append(row)
            continue
        out.append(check_record(rec, path, rules))
    return to_table(out, CHECKED)


@dataclass
class PromptSet:
    prompts: Any  # ray.data.Dataset, PROMPT schema
    quarantine: Any  # ray.data.Dataset, QUARANTINE schema


def load_prompts(cfg: PromptsConfig, categories: Iterable[str] | None = None) -> PromptSet:
    """Read, validate and de-duplicate every source; materialised (pools are small)."""
    import ray.data

    rules = RowRules(tuple(categories) if categories is not None else None, cfg.max_chars)
    parts = [read_raw(uri) for uri in cfg.sources]
    raw = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    checked = raw.map_batches(check_batch, fn_kwargs={"rules": rules}, batch_format="pyarrow")
    tables = [t for t in ray.get(checked.materialize().to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables(tables) if tables else CHECKED.empty_table()
    valid = table.filter(pa.compute.is_null(table["error"]))
    invalid = table.filter(pa.compute.is_valid(table["error"]))
    # Deduplicate by id. Pools fit in the driver (millions of short rows); a groupby shuffle
    # would cost more than it saves at this size.
    first: dict[str, dict[str, Any]] = {}
    dropped = []
    for r in sorted(valid.to_pylist(), key=lambda r: (r["id"], r["raw"])):
        if r["id"] in first:
            dropped.append(r | {"error": f"duplicate (of {r['id']})"})
        else:
            first[r["id"]] = r
    kept = list(first.values())
    if cfg.limit is not None:
        kept = kept[: cfg.limit]
    quarantine = [quarantine_row("prompts", r["error"], r["raw"]) for r in invalid.to_pylist()]
    quarantine += [quarantine_row("prompts", r["error"], r["raw"], r["id"]) for r in dropped]
    prompts = to_table([{k: r[k] for k in PROMPT.names} for r in kept], PROMPT)
    log.info("prompts: %d kept, %d quarantined", prompts.num_rows, len(quarantine))
    return PromptSet(
        ray.data.from_arrow(prompts), ray.data.from_arrow(to_table(quarantine, QUARANTINE))
    )
