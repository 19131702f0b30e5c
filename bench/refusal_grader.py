"""The refusal grader on the frozen held-out split, next to the string-rules baseline, and
its speed in `deliberate-ray grade`.

Fits the classifier on the `train` split of data/graders/refusal_labels.jsonl (split ids in
data/graders/refusal_split.json), as the grader does at first use, then reports on the
`heldout` split: binary agreement (compliance vs any refusal) and three-way agreement, for
all held-out rows and for the real model outputs alone; the confusion matrix; calibration
(expected calibration error of the top probability, 10 bins); agreement on the held-out
replies the coherence grader reads as coherent and as degenerate, apart. --learning-curve adds
5-fold cross-validation on train, grouped by prompt (no prompt on both sides of a fold), fitted
on 25/50/75/100% of each fold's training rows: how much more labelled data of this kind would
buy. Speed: `deliberate-ray grade`
run as a user runs it, on a file of held-out rows repeated to --speed-rows rows; rows/s of the
whole command (start-up and fit included) and of the grading loop (from its progress bar).

    .venv/bin/python bench/refusal_grader.py [--choose-c] [--learning-curve] [--show-errors]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from deliberate_ray.graders.coherence import degenerate
from deliberate_ray.graders.refusal import (
    DEFAULT_C,
    LABELS,
    RefusalClassifier,
    is_refusal,
    load_labelled,
    rule_label,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "refusal_grader.json"


def agreement(pred: list[str], gold: list[str]) -> dict[str, float]:
    binary = np.mean([is_refusal(p) == is_refusal(g) for p, g in zip(pred, gold, strict=True)])
    exact = np.mean([p == g for p, g in zip(pred, gold, strict=True)])
    return {"binary": round(float(binary), 4), "three_way": round(float(exact), 4)}


def confusion(pred: list[str], gold: list[str]) -> dict[str, dict[str, int]]:
    counts = Counter(zip(gold, pred, strict=True))
    return {g: {p: counts[(g, p)] for p in LABELS} for g in LABELS}


def ece(probs: np.ndarray, gold: list[str], bins: int = 10) -> float:
    top = probs.max(axis=1)
    right = probs.argmax(axis=1) == np.array([LABELS.index(g) for g in gold])
    total = 0.0
    for lo in np.linspace(0, 1, bins, endpoint=False):
        sel = (top > lo) & (top <= lo + 1 / bins)
        if sel.any():
            total += sel.mean() * abs(top[sel].mean() - right[sel].mean())
    return round(float(total), 4)


def learning_curve(train: list, fractions=(0.25, 0.5, 0.75, 1.0)) -> dict[str, dict]:
    """Grouped-by-prompt 5-fold CV on train, fitting on a fraction of each fold's rows."""
    from sklearn.model_selection import GroupKFold

    groups = [r.prompt for r in train]
    rng = np.random.default_rng(0)
    folds = list(GroupKFold(5).split(train, groups=groups))
    curve = {}
    for frac in fractions:
        pred: list[str] = [""] * len(train)
        sizes = []
        for fit_idx, test_idx in folds:
            fit_idx = rng.permutation(fit_idx)[: int(len(fit_idx) * frac)]
            sizes.append(len(fit_idx))
            clf = RefusalClassifier.fit([train[i] for i in fit_idx])
            labels = clf.predict([(train[i].prompt, train[i].completion) for i in test_idx])
            for i, label in zip(test_idx, labels, strict=True):
                pred[i] = label
        curve[str(frac)] = agreement(pred, [r.label for r in train]) | {
            "fit_rows": int(np.mean(sizes))
        }
    return curve


def grade_speed(rows: list, n: int) -> dict[str, float]:
    """Run `deliberate-ray grade` on n rows; rows/s end to end and in the grading loop."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        with inp.open("w") as f:
            for i in range(n):
                r = rows[i % len(rows)]
                f.write(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n")
        cli = Path(sys.executable).with_name("deliberate-ray")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(cli), "grade", "--input", str(inp), "--output", str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - t0
        graded = sum(1 for _ in out.open())
    # tqdm's last report: "n/n [mm:ss<00:00, X row/s]"
    rates = re.findall(r"([\d.]+)\s*row/s", proc.stderr)
    return {
        "rows": graded,
        "command_s": round(wall, 2),
        "rows_per_s_command": round(graded / wall, 1),
        "rows_per_s_grading": float(rates[-1]) if rates else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--choose-c", action="store_true", help="cross-validate C on train")
    parser.add_argument("--learning-curve", action="store_true", help="grouped CV on train")
    parser.add_argument("--show-errors", action="store_true")
    parser.add_argument("--speed-rows", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    rows = load_labelled()
    train = [r for r in rows if r.split == "train"]
    heldout = [r for r in rows if r.split == "heldout"]
    doc: dict = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "rows": {"train": len(train), "heldout": len(heldout)},
        "real_share": round(sum(r.real for r in rows) / len(rows), 3),
        "heldout_labels": dict(Counter(r.label for r in heldout)),
        "C": DEFAULT_C,
    }
    if args.choose_c:
        losses = RefusalClassifier.choose_c(train)
        doc["cv_log_loss"] = {str(c): round(v, 4) for c, v in losses.items()}
        print("5-fold CV log loss on train:", doc["cv_log_loss"])
    t0 = time.perf_counter()
    clf = RefusalClassifier.fit(train)
    doc["fit_s"] = round(time.perf_counter() - t0, 2)
    pairs = [(r.prompt, r.completion) for r in heldout]
    probs = clf.probs(pairs)
    learned = clf.predict(pairs)
    rules = [rule_label(r.completion) for r in heldout]
    gold = [r.label for r in heldout]
    real = [i for i, r in enumerate(heldout) if r.real]

    def on(idx: list[int], pred: list[str]) -> dict[str, float]:
        return agreement([pred[i] for i in idx], [gold[i] for i in idx]) | {"n": len(idx)}

    everything = list(range(len(heldout)))
    doc["heldout"] = {
        "classifier": on(everything, learned),
        "rules": on(everything, rules),
    }
    doc["heldout_real_outputs"] = {"classifier": on(real, learned), "rules": on(real, rules)}
    coherent = [i for i, r in enumerate(heldout) if degenerate(r.completion, r.prompt) is None]
    garbled = sorted(set(everything) - set(coherent))
    doc["heldout_by_coherence"] = {
        "coherent": {"classifier": on(coherent, learned), "rules": on(coherent, rules)},
        "degenerate": {"classifier": on(garbled, learned), "rules": on(garbled, rules)},
    }
    if args.learning_curve:
        doc["learning_curve_train_cv"] = learning_curve(train)
    doc["confusion_classifier"] = confusion(learned, gold)
    doc["ece_classifier"] = ece(probs, gold)
    doc["speed"] = grade_speed(heldout, args.speed_rows)

    print(f"machine: {doc['machine']}")
    print(f"rows: train {len(train)}, heldout {len(heldout)}; real outputs {doc['real_share']:.0%}")
    print(f"heldout labels: {doc['heldout_labels']}\n")
    print("| held-out rows | grader | binary | three-way | n |")
    print("|---|---|---|---|---|")
    for part in ("heldout", "heldout_real_outputs"):
        for name in ("classifier", "rules"):
            a = doc[part][name]
            print(f"| {part} | {name} | {a['binary']:.1%} | {a['three_way']:.1%} | {a['n']} |")
    for part, by in doc["heldout_by_coherence"].items():
        for name, a in by.items():
            row = f"{a['binary']:.1%} | {a['three_way']:.1%} | {a['n']}"
            print(f"| {part} replies | {name} | {row} |")
    if args.learning_curve:
        print("\ntrain CV grouped by prompt, by rows fitted:", doc["learning_curve_train_cv"])
    print(f"\nconfusion (gold -> predicted): {doc['confusion_classifier']}")
    print(f"calibration error (ECE, 10 bins): {doc['ece_classifier']}")
    print(f"speed: {doc['speed']}")
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.show_errors:
        for r, p in zip(heldout, learned, strict=True):
            if p != r.label:
                print(f"\n[{r.source}: {r.label} -> {p}] {r.prompt[:80]!r}")
                print(f"  {r.completion[:240]!r}")


if __name__ == "__main__":
    main()
