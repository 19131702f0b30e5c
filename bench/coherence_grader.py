"""Agreement of the coherence grader (deliberate_ray/graders/coherence.py) with the hand labels
of real replies in data/graders/coherence_labels.jsonl, per split (dev: the thresholds were
chosen while reading it; heldout: labelled after the rules were fixed).

    .venv/bin/python bench/coherence_grader.py
"""

from __future__ import annotations

import json
from pathlib import Path

from deliberate_ray.graders.coherence import degenerate

LABELS = Path(__file__).resolve().parents[1] / "data" / "graders" / "coherence_labels.jsonl"


def scores(rows: list[dict]) -> dict[str, float | int]:
    """Agreement, share of degenerate replies caught, share of coherent ones flagged."""
    pairs = [
        (degenerate(r["reply"], r["prompt"]) is not None, r["label"] == "degenerate") for r in rows
    ]
    bad = sum(t for _, t in pairs)
    return {
        "rows": len(pairs),
        "agreement": sum(p == t for p, t in pairs) / len(pairs),
        "degenerate_caught": sum(p and t for p, t in pairs) / bad,
        "coherent_flagged": sum(p and not t for p, t in pairs) / (len(pairs) - bad),
    }


def main() -> None:
    rows = [json.loads(x) for x in LABELS.read_text(encoding="utf-8").splitlines() if x.strip()]
    for split in ("dev", "heldout"):
        got = scores([r for r in rows if r["split"] == split])
        print(split, json.dumps({k: round(v, 3) for k, v in got.items()}))


if __name__ == "__main__":
    main()
