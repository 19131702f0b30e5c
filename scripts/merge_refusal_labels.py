"""Merge a labelled pool of real replies (scripts/build_refusal_pool.py) and new hand-written
rows into data/graders/refusal_labels.jsonl, then freeze the new ids' split.

Labelling (data/graders/README.md): the pool was cut into chunks, each read and labelled by
hand row by row, with the first 20 rows of every next chunk labelled twice (by two labellers)
to measure agreement. `--adjudicated` holds the final label of each double-labelled row the
two disagreed on (decided by reading the reply again); an undecided disagreement is an error.

    .venv/bin/python scripts/merge_refusal_labels.py --pool /tmp/pool/pool.jsonl \\
        --labels '/tmp/pool/labels_*.jsonl' --handwritten '/tmp/pool/handwritten_*.jsonl' \\
        --adjudicated /tmp/pool/adjudicated.json
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "graders" / "refusal_labels.jsonl"
LABELS = ("full_compliance", "full_refusal", "partial_refusal")


def read(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", required=True)
    p.add_argument("--labels", required=True, help="glob of label files")
    p.add_argument("--handwritten", default="", help="glob of hand-written row files")
    p.add_argument("--adjudicated", default="")
    a = p.parse_args()

    votes: dict[str, list[str]] = defaultdict(list)
    for path in sorted(glob.glob(a.labels)):
        for r in read(path):
            if r["label"] not in LABELS:
                sys.exit(f"{path}: {r['id']}: bad label {r['label']!r}")
            votes[r["id"]].append(r["label"])
    decided = json.loads(Path(a.adjudicated).read_text()) if a.adjudicated else {}
    twice = {i: v for i, v in votes.items() if len(v) > 1}
    agree = sum(len(set(v)) == 1 for v in twice.values())
    binary = sum(len({x != "full_compliance" for x in v}) == 1 for v in twice.values())
    print(
        f"double-labelled rows: {len(twice)}; three-way agreement {agree}/{len(twice)}, "
        f"binary {binary}/{len(twice)}"
    )
    final = {}
    for i, v in votes.items():
        if len(set(v)) == 1:
            final[i] = v[0]
        elif i in decided:
            final[i] = decided[i]
        else:
            sys.exit(f"{i}: labellers disagree {v}; add it to --adjudicated")

    existing = read(str(DATA))
    have = {r["id"] for r in existing}
    out = list(existing)
    pool = read(a.pool)
    missing = [r["id"] for r in pool if r["id"] not in final]
    if missing:
        sys.exit(f"{len(missing)} pool rows have no label, e.g. {missing[:3]}")
    for r in pool:
        if r["id"] not in have:
            out.append(
                {
                    "id": r["id"],
                    "source": r["source"],
                    "model": r["model"],
                    "temperature": r["temperature"],
                    "spec_in_context": r["spec_in_context"],
                    "label": final[r["id"]],
                    "prompt": r["prompt"],
                    "completion": r["completion"],
                }
            )
    for path in sorted(glob.glob(a.handwritten)) if a.handwritten else []:
        for r in read(path):
            if r["label"] not in LABELS:
                sys.exit(f"{path}: bad label {r['label']!r}")
            key = hashlib.sha256(f"{r['prompt']}\0{r['completion']}".encode()).hexdigest()[:12]
            if f"hw-{key}" not in have:
                out.append(
                    {
                        "id": f"hw-{key}",
                        "source": f"handwritten_{r['style']}",
                        "model": None,
                        "temperature": None,
                        "spec_in_context": None,
                        "label": r["label"],
                        "prompt": r["prompt"],
                        "completion": r["completion"],
                    }
                )
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        sys.exit("duplicate ids after the merge")
    DATA.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"{DATA}: {len(out)} rows ({len(out) - len(existing)} new)")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "freeze_refusal_split.py")], check=True)


if __name__ == "__main__":
    main()
