"""Read any supported record source (JSONL, Parquet, CSV; local or remote through fsspec)
row by row, keeping bad lines as values instead of failing: the shared reader of the
validator, eval suites and graders."""

from __future__ import annotations

import json
from typing import Any

from deliberate_ray.prompts import source_format


def iter_records(uri: str) -> list[tuple[int, Any]]:
    """(line/row number, parsed record or JSONDecodeError) for a local or remote source."""
    import fsspec

    fmt = source_format(uri)
    if fmt == "jsonl":
        out: list[tuple[int, Any]] = []
        with fsspec.open(uri, "r", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((n, e))
        return out
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(uri, "rb") as f:
            rows = pq.read_table(f).to_pylist()
    else:
        import pyarrow.csv as pcsv

        with fsspec.open(uri, "rb") as f:
            rows = pcsv.read_csv(f).to_pylist()
    return list(enumerate(rows, 1))
