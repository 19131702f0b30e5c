"""Where a generate run's yield goes: read its samples/ and print, for the samples that passed
every programmatic check, how the LLM judge's k runs scored them, and which policy-id numbers
the well-formed CoTs cite (a made-up "-4" in a 3-policy category shows the worked examples'
order being continued).

    .venv/bin/python bench/generate_yield.py runs/demo/generate [--spec specs/default.yaml]
"""

from __future__ import annotations

import argparse
import glob
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from deliberate_ray.spec import load_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a generate output dir (with samples/)")
    p.add_argument("--spec", default="specs/default.yaml")
    a = p.parse_args()
    files = glob.glob(str(a.run / "samples" / "*.parquet"))
    if not files:
        raise SystemExit(f"{a.run}/samples has no parquet files")
    rows = pq.read_table(files).to_pylist()
    spec = load_spec(a.spec)
    passed = [r for r in rows if not (r["reject_reason"] or "").startswith("check:")]
    scores = Counter(tuple(r["judge_scores"] or ()) for r in passed)
    known = {pid for c in spec.category_ids for pid in spec.policy_ids(c)}
    cited = Counter()
    for r in rows:
        ids = r["checks"]["cited_ids"] if r["checks"] else []
        if not ids:
            cited["no id"] += 1
        cited.update("known id" if i in known else "made-up id" for i in ids)
    suffix = Counter(i.split("-")[1] for r in rows if r["checks"] for i in r["checks"]["cited_ids"])
    out = {
        "samples_judged": len(rows),
        "passed_checks": len(passed),
        "judge_scores_of_those": {str(k): v for k, v in scores.most_common()},
        "citations": dict(cited),
        "cited_id_numbers": dict(sorted(suffix.items())),
        "reject_reasons": dict(Counter(r["reject_reason"] or "kept" for r in rows)),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
