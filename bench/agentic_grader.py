"""Agreement of the agentic grader (graders/agentic.py) with hand labels of real replies.

The labels (data/graders/agentic_labels.jsonl) are real replies of this project's models to
the agentic suite (scripts/agentic_replies.py), each read and labelled by hand: did the reply
take the harmful action its scenario offers (`took_action`), with a one-line reason. This
script grades every labelled reply with the scenario's harm spec and reports accuracy,
precision and recall of `harmful_action`, the confusion counts, per split, model and harm
type, how many replies attempted any tool call, and every disagreement. Split `dev`: the
replies whose labels were read while the grader and the harm specs were fixed; `heldout`:
replies sampled and labelled afterwards, never used to change either.

    .venv/bin/python bench/agentic_grader.py
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deliberate_ray.evals.suites import load_suite  # noqa: E402
from deliberate_ray.graders.agentic import grade, tool_calls  # noqa: E402


def scores(pairs: list[tuple[bool, bool]]) -> dict:
    """pairs: (label, grader) -> accuracy, precision, recall and the confusion counts."""
    tp = sum(a and b for a, b in pairs)
    fp = sum(b and not a for a, b in pairs)
    fn = sum(a and not b for a, b in pairs)
    tn = sum(not a and not b for a, b in pairs)
    n = len(pairs)
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "labelled_harmful": tp + fn,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=Path, default=ROOT / "data/graders/agentic_labels.jsonl")
    p.add_argument("--suite", type=Path, default=ROOT / "data/eval/agentic.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/agentic_grader.json")
    a = p.parse_args()

    harm = {r["id"]: r["harm"] for r in load_suite(a.suite)}
    rows = [json.loads(x) for x in a.labels.read_text().splitlines() if x.strip()]
    pairs, by_model, by_type, by_split, wrong = [], *(defaultdict(list) for _ in range(3)), []
    attempted = defaultdict(int)
    for r in rows:
        spec = harm[r["scenario"]]
        if spec is None:
            continue
        got = grade(r["reply"], spec)
        pair = (bool(r["took_action"]), bool(got))
        pairs.append(pair)
        by_model[r["model"]].append(pair)
        by_type[spec["type"]].append(pair)
        by_split[r["split"]].append(pair)
        names = {c.name for c in tool_calls(r["reply"])}
        known = names & {"sendemail", "forward", "deletefile", "run", "editfile", "readinbox"}
        attempted[r["model"]] += bool(known)
        if pair[0] != pair[1]:
            wrong.append(
                {
                    "id": r["id"],
                    "split": r["split"],
                    "model": r["model"],
                    "scenario": r["scenario"],
                    "label": pair[0],
                    "grader": pair[1],
                    "reason": r["reason"],
                }
            )
    result = {
        "labels": str(a.labels.relative_to(ROOT)),
        "suite": str(a.suite.relative_to(ROOT)),
        "overall": scores(pairs),
        "by_split": {s: scores(v) for s, v in sorted(by_split.items())},
        "by_model": {m: scores(v) for m, v in sorted(by_model.items())},
        "by_harm_type": {t: scores(v) for t, v in sorted(by_type.items())},
        "replies_with_a_tool_call": dict(sorted(attempted.items())),
        "disagreements": wrong,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("by_split", "replies_with_a_tool_call")}, indent=1))
    print(f"{len(wrong)} disagreements; wrote {a.out}")


if __name__ == "__main__":
    main()
