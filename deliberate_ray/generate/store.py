"""The output folder of the generate stage: committed shards, resume, stats, dataset card.

Layout: `tuples/`, `samples/`, `quarantine/` hold `part-<shard>.parquet` files, and
`_commits/<shard>.json` lists the prompt ids (and stats) of each shard. A shard counts only
once its commit file exists; every file is written atomically (a temp name and a rename
locally, one PUT on an object store: `storage`), so a killed run leaves at most uncommitted
parts, which the next run deletes before it redoes those prompts. A prompt is therefore
written exactly once, however often the run is killed. The folder may be a URI (s3://...).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from deliberate_ray import storage
from deliberate_ray.config import ConfigError
from deliberate_ray.contracts import JUDGED, QUARANTINE, TUPLE

TABLES: dict[str, pa.Schema] = {"tuples": TUPLE, "samples": JUDGED, "quarantine": QUARANTINE}
COMMITS = "_commits"
PROMPTS_SHARD = "prompts"  # the prompt loader's quarantine, rewritten by every run


def _atomic_write(path: str, data: bytes | pa.Table) -> None:
    if isinstance(data, pa.Table):
        storage.write_table(path, data)
    else:
        storage.write_bytes(path, data)


class StaleOutput(ConfigError):
    """The folder holds shards made with another spec, teacher or judge."""


class ShardStore:
    """Resumable, shard-by-shard writer of the generate outputs.

    `key` names what made the rows (spec_sha, teacher, judge: `generate.run.resume_key`).
    Every commit records it; a folder holding commits of another key is refused
    (StaleOutput) rather than resumed, so old and new tuples never mix. `fresh=True`
    deletes them first."""

    def __init__(
        self,
        root: str | Path,
        key: str = "",
        fresh: bool = False,
        tables: dict[str, pa.Schema] | None = None,
    ):
        self.root = storage.absolute(root)
        self.key = key
        self.tables = TABLES if tables is None else tables
        if fresh:
            self.clear()
        for name in [*self.tables, COMMITS]:
            storage.makedirs(storage.join(self.root, name))
        self.commits = self._read_commits()
        other = sorted({c.get("key", "(none)") for c in self.commits.values()} - {key})
        if key and other:
            n = sum(1 for c in self.commits.values() if c.get("key", "(none)") != key)
            raise StaleOutput(
                str(self.root),
                [
                    f"{n} committed shards were generated with another spec, teacher or judge "
                    f"(resume key {', '.join(other)}; this config: {key}); use another "
                    "output_dir, or pass --fresh to delete them and start again",
                ],
            )
        self._remove_uncommitted()
        self.run_tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.seq = 0

    def _read_commits(self) -> dict[str, dict[str, Any]]:
        out = {}
        for f in storage.glob(storage.join(self.root, COMMITS), "*.json"):
            out[storage.name(f).removesuffix(".json")] = storage.read_json(f)
        return out

    def _remove_uncommitted(self) -> None:
        for name in self.tables:
            for f in storage.listdir(storage.join(self.root, name)):
                shard = f.removeprefix("part-").removesuffix(".parquet")
                if f.startswith(".tmp-") or (shard not in self.commits and shard != PROMPTS_SHARD):
                    storage.remove(storage.join(self.root, name, f))

    def clear(self) -> None:
        """Delete every shard, commit and stats file of a previous run."""
        for name in [*self.tables, COMMITS, "stats.json", "README.md"]:
            storage.remove(storage.join(self.root, name))

    @property
    def done_ids(self) -> set[str]:
        return {i for c in self.commits.values() for i in c["ids"]}

    def path(self, name: str) -> str:
        return storage.join(self.root, name)

    def write_prompt_quarantine(self, table: pa.Table) -> None:
        path = storage.join(self.root, "quarantine", f"part-{PROMPTS_SHARD}.parquet")
        if table.num_rows:
            _atomic_write(path, table)
        else:
            storage.remove(path)

    def commit(
        self, ids: list[str], tables: dict[str, list[dict[str, Any]]], stats: dict[str, Any]
    ) -> str:
        """Write one shard's parts, then its commit file (the moment the shard counts)."""
        shard = f"{self.run_tag}-{self.seq:05d}"
        self.seq += 1
        for name, schema in self.tables.items():
            if tables.get(name):  # no empty files: `datasets` cannot read a zero-row part
                table = pa.Table.from_pylist(tables[name], schema=schema)
                _atomic_write(storage.join(self.root, name, f"part-{shard}.parquet"), table)
        record = {"shard": shard, "key": self.key, "ids": ids, "stats": stats}
        _atomic_write(
            storage.join(self.root, COMMITS, f"{shard}.json"), json.dumps(record).encode()
        )
        self.commits[shard] = record
        return shard

    def totals(self) -> dict[str, Any]:
        """Stats of every committed shard, summed (the whole output, over all runs)."""
        return merge_stats(c["stats"] for c in self.commits.values())


def merge_stats(parts: Any) -> dict[str, Any]:
    """Sum nested dicts of counts (Counters at the leaves)."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                total[key] = dict(Counter(total.get(key, {})) + Counter(value))
            else:
                total[key] = total.get(key, 0) + value
    return total


CARD = """\
# deliberate-ray generated dataset

Deliberative Alignment SFT tuples: prompt (spec stripped), chain of thought that cites the
spec's policy ids, and answer; written by `deliberate-ray generate`.

- spec: `{spec_path}` (variant `{variant}`, spec_sha `{spec_sha}`)
- teacher: `{teacher}`, {samples_per_prompt} samples per prompt, reasoning format `{fmt}`
- judge: `{judge}`, threshold {threshold}
- prompts done: {prompts}; tuples: {kept} (acceptance rate {acceptance:.1%})
- samples judged: {judged}; quarantined rows: {quarantined}

## Files

| folder | rows | contract |
|---|---|---|
| `tuples/` | {kept} | `id`, `messages` (no spec), `cot`, `answer`, `category`, `score`, ... |
| `samples/` | {judged} | every judged sample: `judge_scores`, `score`, `checks`, `keep`, ... |
| `quarantine/` | {quarantined} | `id`, `stage`, `reason`, `raw`: every dropped row and why |

`stats.json` has counts per stage, reason and category, tokens and throughput.

```python
import datasets, ray
datasets.load_dataset("parquet", data_files="{root}/tuples/*.parquet")
ray.data.read_parquet("{root}/tuples")
```

## Quarantine and rejection reasons

{reasons}
"""


def write_card(root: str | Path, info: dict[str, Any], stats: dict[str, Any]) -> None:
    reasons = Counter(stats.get("quarantine", {})) + Counter(stats.get("rejected", {}))
    lines = [f"- `{r}`: {n}" for r, n in sorted(reasons.items())] or ["- none"]
    text = CARD.format(
        **info,
        root=root,
        prompts=stats.get("prompts", 0),
        kept=stats.get("kept", 0),
        judged=stats.get("judged", 0),
        quarantined=sum(stats.get("quarantine", {}).values()),
        acceptance=stats.get("acceptance_rate", 0.0),
        reasons="\n".join(lines),
    )
    _atomic_write(storage.join(root, "README.md"), text.encode())
