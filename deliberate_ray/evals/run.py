"""`run_eval`: suites x models -> replies (Ray Data, HTTP) -> graders -> metrics -> report.

Suites (what to ask), the endpoint (how answers are obtained) and the graders (how they are
scored) are independent pieces, as in inspect_ai: any OpenAI-compatible endpoint works, and
the CLI, `jobs/eval.py` and the pipeline all call this one function.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from deliberate_ray import storage
from deliberate_ray.config import EvalConfig
from deliberate_ray.evals.collect import check_endpoint, collect, request_items
from deliberate_ray.evals.metrics import compare_models, compute_metrics
from deliberate_ray.evals.report import write_chart, write_report
from deliberate_ray.evals.suites import load_suite
from deliberate_ray.graders.refusal import GRADERS
from deliberate_ray.graders.scorers import apply_scorers
from deliberate_ray.results import EvalResult
from deliberate_ray.spec import load_spec

log = logging.getLogger(__name__)

REPLY_FIELDS = (
    "reasoning",
    "content",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "error",
    "answered",
    "no_answer_reason",
    "label",
    "refusal",
    *(f"label_{g}" for g in GRADERS),
    "coherence",
    "helpful",
    "style_ok",
    "cites_policy",
    "harm_type",
    "harmful_action",
)
RESPONSES = pa.schema(
    [
        ("suite", pa.string()),
        ("id", pa.string()),
        ("base_id", pa.string()),
        ("template", pa.string()),
        ("model", pa.string()),
        ("category", pa.string()),
        ("expected", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("prompt", pa.string()),
        ("reasoning", pa.string()),
        ("content", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("error", pa.string()),
        ("answered", pa.bool_()),
        ("no_answer_reason", pa.string()),
        ("label", pa.string()),
        ("refusal", pa.bool_()),
        *((f"label_{g}", pa.string()) for g in GRADERS),
        ("coherence", pa.string()),
        ("helpful", pa.bool_()),
        ("style_ok", pa.bool_()),
        ("cites_policy", pa.bool_()),
        ("harm_type", pa.string()),
        ("harmful_action", pa.bool_()),
        ("policy_ok", pa.bool_()),
        ("rubric_score", pa.float64()),
    ]
)


def answer_and_grade(
    rows: list[dict[str, Any]],
    endpoint: str,
    models: list[str],
    cfg: EvalConfig,
    answered: Callable[[], None] | None = None,
    groups: list[list[str]] | None = None,
    serve_group: Callable[[list[str]], str] | None = None,
) -> list[dict[str, Any]]:
    """Suite rows -> one graded response dict per (row, model).

    The models answer one after another, each model's requests all in flight together: on
    a small machine each served model is an engine of its own, and two busy engines fight
    for the same cores (bench/serve_models_at_once.py). The graders run once every reply is in,
    after `answered()` (the pipeline shuts its Serve app down there, freeing the engines'
    memory and cores for the classifier)."""
    prompts = [r["messages"][-1]["content"] for r in rows]
    parts = []
    for group in groups or [models]:
        if serve_group is not None:  # this group's models replace the previous group's
            endpoint = serve_group(group)
            check_endpoint(endpoint, group, cfg)
        for model in group:
            t0 = time.perf_counter()
            parts.append(collect(request_items(rows, [model], cfg), endpoint, cfg).materialize())
            took = time.perf_counter() - t0
            log.info("eval: %s answered %d prompts in %.1f s", model, len(rows), took)
    if answered is not None:
        answered()
    replies = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ctx = {
        "prompts": prompts,
        "expected": [r["expected"] for r in rows],
        "categories": [r["category"] for r in rows],
        "harm": [r.get("harm") for r in rows],
        "graders": list(cfg.graders),
        "spec_path": cfg.spec,
    }
    graded = apply_scorers(replies, list(cfg.scorers), ctx).take_all()
    out = []
    for g in sorted(graded, key=lambda g: (g["key"], g["model"])):
        row = rows[g["key"]]
        out.append(
            {
                "suite": row["suite"],
                "id": row["id"],
                "base_id": row["base_id"],
                "template": row["template"],
                "model": g["model"],
                "category": row["category"],
                "expected": row["expected"],
                "tags": row["tags"],
                "prompt": prompts[g["key"]],
                "messages": row["messages"],
            }
            | {k: g[k] for k in REPLY_FIELDS}
            | {"reasoning": g["reasoning"] or None, "error": g["error"] or None}
        )
    return out


def add_style_and_policy(responses: list[dict[str, Any]], cfg: EvalConfig) -> str:
    """Fill policy_ok, and style_ok from the LLM judge when one is configured (the grader
    stage filled the rule checks); returns where style came from."""
    for r in responses:
        r["policy_ok"] = None
    if cfg.judge is None:
        return "rules"
    spec = load_spec(cfg.spec)
    from deliberate_ray.graders.llm_judge import judge_rows

    verdicts = judge_rows(responses, spec, cfg.judge, cfg.spec_variant)
    for r, (style, policy, _) in zip(responses, verdicts, strict=True):
        r["style_ok"], r["policy_ok"] = style, policy
    return "llm_judge"


def add_rubric_scores(responses: list[dict[str, Any]], suites: list[str], cfg: EvalConfig) -> None:
    """`rubric_score` from a suite's own rubric grader (graders/rubric.py), with an LLM judge;
    None elsewhere."""
    from deliberate_ray.graders.rubric import load_rubric, rubric_path, rubric_rows

    for r in responses:
        r["rubric_score"] = None
    rubrics = {Path(s).stem: load_rubric(s) for s in suites if rubric_path(s).exists()}
    if not rubrics:
        return
    if cfg.judge is None:
        log.warning(
            "eval: suites %s have a rubric grader; set eval.judge to score them", sorted(rubrics)
        )
        return
    for r, score in zip(responses, rubric_rows(responses, rubrics, cfg.judge), strict=True):
        r["rubric_score"] = score


def monitor_by_suite(responses: list[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    """CoT-monitorability metrics per suite and model (evals/monitor.py, docs/monitorability.md)."""
    from deliberate_ray.evals.monitor import monitorability

    spec = load_spec(cfg.spec)
    out = {}
    for suite in sorted({r["suite"] for r in responses}):
        rows = [r for r in responses if r["suite"] == suite]
        out[suite] = monitorability(rows, spec, cfg.bootstrap, cfg.confidence, cfg.seed)
    return out


def run_eval(
    section: EvalConfig,
    run_dir: str,
    *,
    models: list[str],
    endpoint: str = "",
    answered: Callable[[], None] | None = None,
    groups: list[list[str]] | None = None,
    serve_group: Callable[[list[str]], str] | None = None,
) -> EvalResult:
    """Ask every model every prompt of `section.suites`, grade, and write responses.parquet,
    metrics.json, report.md and metrics.png under `section.output_dir` (null: {run_dir}/eval).
    Returns the metrics document. `answered` runs once every reply is in, before grading
    (not with an LLM judge that may ask the endpoint). With `serve_group`, the models are
    served `groups` at a time: it serves one group and returns its endpoint (`endpoint` is
    then unused), so a small machine never holds more engines than a group."""
    import ray

    cfg = section
    suites = cfg.suites
    out = storage.absolute(cfg.output_dir or storage.join(run_dir, "eval"))

    if not models:
        raise ValueError("give at least one model to evaluate")
    if cfg.baseline is not None and cfg.baseline not in models:
        raise ValueError(
            f"eval.baseline: bad value {cfg.baseline!r} -> must be one of the evaluated "
            f"models {models}"
        )
    rows = [r for s in suites for r in load_suite(s, cfg.limit)]
    if serve_group is None:
        check_endpoint(endpoint, models, cfg)
    if not ray.is_initialized():
        ray.init()
    start = time.time()
    responses = answer_and_grade(
        rows, endpoint, models, cfg, answered if cfg.judge is None else None, groups, serve_group
    )
    style_source = add_style_and_policy(responses, cfg)
    add_rubric_scores(responses, suites, cfg)
    doc = {
        "endpoint": endpoint,
        "models": models,
        "suites": sorted({r["suite"] for r in rows}),
        "n_requests": len(responses),
        "seconds": round(time.time() - start, 1),
        "style_source": style_source,
        "config": cfg.model_dump(mode="json"),
        "graders": list(cfg.graders),
        "baseline": cfg.baseline or models[0],
        "results": compute_metrics(responses, cfg),
        "paired": compare_models(responses, models, cfg),
        "monitor": monitor_by_suite(responses, cfg),
    }
    storage.makedirs(out)
    table = pa.Table.from_pylist(
        [{k: r[k] for k in RESPONSES.names} for r in responses], schema=RESPONSES
    )
    storage.write_table(storage.join(out, "responses.parquet"), table)
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(doc, indent=2) + "\n")
    write_chart(doc, storage.join(out, "metrics.png"))
    write_report(doc, storage.join(out, "report.md"))
    failed = [r["error"] for r in responses if r["error"]]
    if failed:  # counted per suite in the report; say it where the user looks, too
        log.warning(
            "eval: %d of %d requests failed; first: %s", len(failed), len(responses), failed[0]
        )
    log.info("eval: %d requests in %.0f s -> %s", len(responses), doc["seconds"], out)
    return EvalResult(out_dir=out, **doc)
