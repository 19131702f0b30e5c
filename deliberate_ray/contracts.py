"""Arrow schemas of the data contracts (README, "Running each stage alone"), and id hashing.

Every stage writes exactly these columns, so a stage can run alone on another stage's
Parquet output, and tests can check outputs column by column.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

PROMPT = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES),
        ("category", pa.string()),
        ("ideal_action", pa.string()),
        ("source", pa.string()),
    ]
)

SAMPLE = pa.schema(
    list(PROMPT)
    + [
        ("sample_index", pa.int32()),
        ("cot", pa.string()),
        ("answer", pa.string()),
        ("raw_text", pa.string()),
        ("num_input_tokens", pa.int32()),
        ("num_generated_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("teacher", pa.string()),
        ("spec_sha", pa.string()),
    ]
)

CHECKS = pa.struct(
    [
        ("format_ok", pa.bool_()),
        ("cites_own_policy", pa.bool_()),
        ("cites_foreign_policy", pa.bool_()),
        ("cited_ids", pa.list_(pa.string())),
        ("predicted_action", pa.string()),
        ("action_matches", pa.bool_()),
        ("style_ok", pa.bool_()),
        ("length_ok", pa.bool_()),
    ]
)

JUDGED = pa.schema(
    list(SAMPLE)
    + [
        ("judge_scores", pa.list_(pa.float64())),
        ("judge_rationales", pa.list_(pa.string())),
        ("score", pa.float64()),
        ("checks", CHECKS),
        ("keep", pa.bool_()),
        ("reject_reason", pa.string()),
    ]
)

TUPLE = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES),
        ("cot", pa.string()),
        ("answer", pa.string()),
        ("category", pa.string()),
        ("ideal_action", pa.string()),
        ("score", pa.float64()),
        ("spec_sha", pa.string()),
        ("teacher", pa.string()),
        ("judge", pa.string()),
        ("created_at", pa.string()),
    ]
)

QUARANTINE = pa.schema(
    [
        ("id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)


def stable_id(*parts: Any, prefix: str = "p") -> str:
    """Deterministic id: a hash of the parts (JSON-encoded, key-sorted)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return f"{prefix}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> Arrow table with exactly `schema` (missing keys become null, extras an error)."""
    names = set(schema.names)
    for r in rows:
        extra = set(r) - names
        if extra:
            raise ValueError(f"row has columns outside the contract: {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)


def quarantine_row(stage: str, reason: str, raw: Any, row_id: str | None = None) -> dict[str, Any]:
    text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
    return {
        "id": row_id or stable_id(stage, text, prefix="q"),
        "stage": stage,
        "reason": reason,
        "raw": text,
    }
