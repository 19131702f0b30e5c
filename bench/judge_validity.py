"""Does the generate stage's LLM judge tell good samples from bad? Both ways of reading its
score, on the real teacher samples of a generate run.

Every well-formed sample of the run (CoT and answer present, whatever the checks said) is
judged k times by the run config's judge engine through the project's engine layer, once
with `scoring: sampled` (the number it writes) and once with `scoring: logprobs` (the
expected digit). The reference labels come from the programmatic checks, which the judge
never sees: `action_matches` (the string-rule refusal grader agrees with the prompt's ideal
action) and `cites_ok` (cites a policy of its own category and no other). For each mode:
the AUC of the min-over-k score against each label (0.5 = no better than chance), the
share of each group at or above the config's threshold, and how often the k runs agree.

    .venv/bin/python bench/judge_validity.py runs/demo/generate --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from deliberate_ray.config import load_config
from deliberate_ray.contracts import MESSAGES
from deliberate_ray.engines import apply_engine
from deliberate_ray.engines.rows import SAMPLING_PARAMS
from deliberate_ray.generate.run import judge_params
from deliberate_ray.judge import expected_score, judge_messages, parse_judgement
from deliberate_ray.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def auc(scores: list[float], labels: list[bool]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counted half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return round(wins / (len(pos) * len(neg)), 3)


def judge(rows: list[dict[str, Any]], cfg: Any, spec: Any, scoring: str) -> list[list[Any]]:
    import ray

    llm = cfg.generate.judge.llm.model_copy(update={"scoring": scoring})
    requests = []
    for i, r in enumerate(rows):
        sample = {
            "category": r["category"],
            "prompt_messages": r["messages"],
            "cot": r["cot"],
            "answer": r["answer"],
            "ideal_action": r["ideal_action"],
        }
        for j in range(llm.k):
            requests.append(
                {
                    "row": i,
                    "run": j,
                    "messages": judge_messages(spec, cfg.spec.variant, sample, llm, run=j),
                    "sampling_params": judge_params(llm, seed=1000 * i + j),
                }
            )
    schema = pa.schema(
        [("row", pa.int64()), ("run", pa.int64()), ("messages", MESSAGES)]
        + [("sampling_params", SAMPLING_PARAMS)]
    )
    ds = ray.data.from_arrow(pa.Table.from_pylist(requests, schema=schema))
    out = apply_engine(ds, llm.engine, ["row", "run"]).take_all()
    scores: list[list[Any]] = [[None] * llm.k for _ in rows]
    for o in out:
        if scoring == "logprobs":
            score, _ = expected_score(o["top_logprobs"])
        else:
            score, _ = parse_judgement(o["generated_text"], llm.prefill)
        scores[o["row"]][o["run"]] = score
    return scores


def summary(scores: list[list[Any]], rows: list[dict[str, Any]], threshold: float) -> dict:
    # An unreadable run scores 0: the pipeline rejects such a sample.
    low = [min(s if s is not None else 0.0 for s in runs) for runs in scores]
    out: dict[str, Any] = {
        "unreadable_runs": sum(s is None for runs in scores for s in runs),
        "runs_within_1_point": round(
            sum(max(r) - min(r) <= 1.0 for r in scores if all(s is not None for s in r))
            / max(1, sum(all(s is not None for s in r) for r in scores)),
            3,
        ),
    }
    for label in ("action_matches", "cites_ok", "both"):
        ys = [r[label] for r in rows]
        passed = [s >= threshold for s in low]
        out[label] = {
            "n_true": sum(ys),
            "n_false": len(ys) - sum(ys),
            "auc": auc(low, ys),
            "kept_if_true": round(
                sum(p for p, y in zip(passed, ys, strict=True) if y) / max(1, sum(ys)), 3
            ),
            "kept_if_false": round(
                sum(p for p, y in zip(passed, ys, strict=True) if not y)
                / max(1, len(ys) - sum(ys)),
                3,
            ),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a generate output dir (with samples/)")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "judge_validity.json"))
    a = p.parse_args()
    import ray

    files = glob.glob(str(a.run / "samples" / "*.parquet"))
    if not files:
        raise SystemExit(f"{a.run}/samples has no parquet files")
    cfg = load_config(a.config)
    spec = load_spec(cfg.spec.path)
    rows = [r for r in pq.read_table(files).to_pylist() if r["cot"] and r["answer"] and r["checks"]]
    for r in rows:
        c = r["checks"]
        r["action_matches"] = bool(c["action_matches"])
        r["cites_ok"] = bool(c["cites_own_policy"]) and not c["cites_foreign_policy"]
        r["both"] = r["action_matches"] and r["cites_ok"]
    ray.init(log_to_driver=False)
    result: dict[str, Any] = {
        "run": str(a.run),
        "config": a.config,
        "judge": cfg.generate.judge.llm.engine.model,
        "k": cfg.generate.judge.llm.k,
        "threshold": cfg.generate.judge.threshold,
        "samples": len(rows),
    }
    for scoring in ("sampled", "logprobs"):
        t = time.time()
        scores = judge(rows, cfg, spec, scoring)
        result[scoring] = summary(scores, rows, cfg.generate.judge.threshold) | {
            "seconds": round(time.time() - t, 1)
        }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
