"""Agreement of the refusal grader with the hand labels on the held-out split.

Fits the classifier on the `train` split of data/graders/refusal_labels.jsonl (as the grader
does at first use), then compares it and the string rules alone with the `heldout` labels:
binary agreement (compliance vs any refusal, the number the issue targets) and 3-class.

    .venv/bin/python bench/refusal_grader.py
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np

from deliberate_ray.graders.embeddings import MiniLMEmbedder
from deliberate_ray.graders.refusal import (
    COMMITTED_WEIGHTS,
    LABELLED_DATA,
    LABELS,
    RefusalClassifier,
    data_key,
    is_refusal,
    load_labelled,
    rule_label,
    save_weights,
)


def agreement(pred: list[str], gold: list[str]) -> tuple[float, float]:
    binary = np.mean([is_refusal(p) == is_refusal(g) for p, g in zip(pred, gold, strict=True)])
    exact = np.mean([p == g for p, g in zip(pred, gold, strict=True)])
    return float(binary), float(exact)


def confusion(pred: list[str], gold: list[str]) -> str:
    counts = Counter(zip(gold, pred, strict=True))
    lines = ["| gold \\ predicted | " + " | ".join(LABELS) + " |", "|---" * 4 + "|"]
    for g in LABELS:
        lines.append(f"| {g} | " + " | ".join(str(counts[(g, p)]) for p in LABELS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(LABELLED_DATA))
    parser.add_argument("--show-errors", action="store_true")
    parser.add_argument(
        "--write-weights", action="store_true", help=f"save the fit to {COMMITTED_WEIGHTS}"
    )
    args = parser.parse_args()

    data = Path(args.data)
    rows = load_labelled(data)
    train = [r for r in rows if r.split == "train"]
    heldout = [r for r in rows if r.split == "heldout"]
    t0 = time.perf_counter()
    clf = RefusalClassifier.fit(train, MiniLMEmbedder())
    fit_s = time.perf_counter() - t0
    gold = [r.label for r in heldout]
    t0 = time.perf_counter()
    learned = clf.predict([r.completion for r in heldout])
    predict_s = time.perf_counter() - t0
    rules = [rule_label(r.completion) for r in heldout]

    print(f"machine: {platform.machine()} CPU, {os.cpu_count()} cores")
    print(f"labelled rows: {len(rows)} (train {len(train)}, heldout {len(heldout)})")
    print(f"heldout labels: {dict(Counter(gold))}")
    print(f"fit: {fit_s:.1f} s; predict {len(heldout)} rows: {predict_s:.2f} s\n")
    print("| grader | binary agreement | 3-class agreement | n |")
    print("|---|---|---|---|")
    for name, pred in (("embeddings + rules (learned)", learned), ("string rules alone", rules)):
        b, e = agreement(pred, gold)
        print(f"| {name} | {b:.1%} | {e:.1%} | {len(gold)} |")
    print("\nlearned grader, confusion on heldout:\n")
    print(confusion(learned, gold))
    if args.write_weights:
        save_weights(clf, data_key(data), COMMITTED_WEIGHTS)
        print(f"\nwrote {COMMITTED_WEIGHTS}")
    if args.show_errors:
        for r, p in zip(heldout, learned, strict=True):
            if p != r.label:
                print(f"\n[{r.label} -> {p}] {r.completion[:160]!r}")


if __name__ == "__main__":
    main()
