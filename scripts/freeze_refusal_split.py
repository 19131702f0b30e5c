"""Add new rows of data/graders/refusal_labels.jsonl to the frozen split file.

Ids already in data/graders/refusal_split.json keep their split, always. A new row goes to
`heldout` when crc32 of its prompt falls in the bottom 30% (so every completion of one prompt
lands on the same side and held-out prompts are never seen in training), else `train`.
Rows whose ids the split file lists but the data no longer holds are reported, not removed.

    .venv/bin/python scripts/freeze_refusal_split.py
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "graders" / "refusal_labels.jsonl"
SPLIT = ROOT / "data" / "graders" / "refusal_split.json"
HELDOUT_SHARE = 0.3


def side(prompt: str) -> str:
    return "heldout" if zlib.crc32(prompt.encode()) % 100 < HELDOUT_SHARE * 100 else "train"


def main() -> None:
    split = json.loads(SPLIT.read_text()) if SPLIT.exists() else {"train": [], "heldout": []}
    known = set(split["train"]) | set(split["heldout"])
    rows = [json.loads(x) for x in DATA.read_text(encoding="utf-8").splitlines() if x.strip()]
    added = 0
    for r in rows:
        if r["id"] not in known:
            split[side(r["prompt"])].append(r["id"])
            known.add(r["id"])
            added += 1
    gone = known - {r["id"] for r in rows}
    split = {
        "rule": split.get("rule")
        or "frozen: ids never move; new rows by crc32(prompt) % 100 < 30 -> heldout",
        "train": sorted(split["train"]),
        "heldout": sorted(split["heldout"]),
    }
    SPLIT.write_text(json.dumps(split, indent=1) + "\n")
    print(f"{added} new ids; train {len(split['train'])}, heldout {len(split['heldout'])}")
    if gone:
        print(f"{len(gone)} ids in the split file have no row in the data: {sorted(gone)[:5]}")
    print_card(rows, split)


def print_card(rows: list[dict], split: dict[str, list[str]]) -> None:
    """The data card's table: rows per source, label and split (markdown)."""
    from collections import Counter

    side_of = {i: s for s in ("train", "heldout") for i in split[s]}
    labels = ("full_compliance", "full_refusal", "partial_refusal")
    counts = Counter((r["source"], r["label"], side_of[r["id"]]) for r in rows)
    print("\n| source | " + " | ".join(labels) + " | train | heldout |")
    print("|---|" + "---:|" * (len(labels) + 2))
    for source in sorted({r["source"] for r in rows}):
        by_label = [sum(counts[(source, lab, s)] for s in ("train", "heldout")) for lab in labels]
        sides = [sum(counts[(source, lab, s)] for lab in labels) for s in ("train", "heldout")]
        print(f"| {source} | " + " | ".join(map(str, by_label + sides)) + " |")
    total = [sum(1 for r in rows if r["label"] == lab) for lab in labels]
    sides = [sum(1 for r in rows if side_of[r["id"]] == s) for s in ("train", "heldout")]
    print("| **all** | " + " | ".join(map(str, total + sides)) + " |")
    real = sum(not r["source"].startswith("handwritten") for r in rows)
    print(f"\n{len(rows)} rows, {real} real model outputs ({real / len(rows):.1%})")


if __name__ == "__main__":
    main()
