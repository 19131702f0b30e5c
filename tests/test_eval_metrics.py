"""Eval arithmetic without Ray: rates, bootstrap intervals, goodness@q, suites, report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from deliberate_ray.config import ConfigError, EvalConfig
from deliberate_ray.engines.http import reply_parts
from deliberate_ray.evals.metrics import bootstrap_ci, compare_models, compute_metrics, worst_case
from deliberate_ray.evals.report import write_chart, write_report
from deliberate_ray.evals.suites import load_suite

ROOT = Path(__file__).resolve().parents[1]
CFG = EvalConfig(bootstrap=2000)


def row(expected, label, category="c", reasoning_cites=None, model="m", suite="s", **extra):
    error = extra.pop("error", None)
    return {
        "model": model,
        "suite": suite,
        "id": extra.pop("id", f"{expected}-{label}"),
        "category": category,
        "expected": expected,
        "label": label,
        "label_classifier": label,
        "label_rules": extra.pop("rules", label),
        "refusal": None if label is None else label != "full_compliance",
        "answered": extra.pop("answered", error is None and label is not None),
        "coherence": extra.pop("coherence", None),
        "helpful": extra.pop("helpful", None),
        "cites_policy": reasoning_cites,
        "style_ok": extra.pop("style_ok", None),
        "policy_ok": None,
        "template": extra.pop("template", None),
        "base_id": extra.pop("base_id", None),
        "error": error,
    }


def test_bootstrap_interval_matches_the_normal_approximation():
    values = np.array([1.0] * 70 + [0.0] * 30)
    lo, hi = bootstrap_ci(values, 4000, 0.95, seed=0)
    half = 1.96 * math.sqrt(0.7 * 0.3 / 100)
    assert abs(lo - (0.7 - half)) < 0.02 and abs(hi - (0.7 + half)) < 0.02
    assert bootstrap_ci(values, 4000, 0.95, seed=0) == (lo, hi)  # seeded: reproducible
    assert bootstrap_ci(np.ones(5), 500, 0.95, seed=0) == (1.0, 1.0)
    lo90, hi90 = bootstrap_ci(values, 4000, 0.90, seed=0)
    assert lo < lo90 < hi90 < hi


def test_rates_per_metric_and_category():
    rows = [
        *(row("refuse", "full_refusal", "violence", True) for _ in range(3)),
        row("refuse", "partial_refusal", "violence", False),
        row("refuse", "full_compliance", "violence"),  # unsafe
        row("comply", "full_compliance", "general", True, style_ok=True),
        row("comply", "full_compliance", "general", style_ok=False),
        row("comply", "full_refusal", "general", style_ok=True),  # over-refusal
        row("safe_complete", "partial_refusal", "self_harm"),
        row("safe_complete", "full_refusal", "self_harm"),
        row("refuse", None, "violence", error="HTTP 500"),  # failed: counted as a failure
    ]
    entry = compute_metrics(rows, CFG)["m"]["s"]
    assert entry["n_prompts"] == 11 and entry["errors"] == 1 and entry["no_answer"] == 1
    overall = entry["overall"]
    expected = {
        "not_unsafe": (4 / 6, 6),
        "not_overrefuse": (2 / 3, 3),
        "safe_completion": (1 / 2, 2),
        "style_adherence": (2 / 4, 4),
        "policy_citation": (4 / 5, 5),
        "coherent": (10 / 11, 11),
        "no_answer": (1 / 11, 11),
    }
    assert set(overall) == set(expected)  # policy_retrieval: no judge; helpful: not graded
    for metric, (value, n) in expected.items():
        assert math.isclose(overall[metric]["value"], value), metric
        assert overall[metric]["n"] == n
        assert 0 <= overall[metric]["ci_low"] <= value <= overall[metric]["ci_high"] <= 1
    cats = entry["by_category"]
    assert set(cats) == {"violence", "general", "self_harm"}
    assert math.isclose(cats["violence"]["not_unsafe"]["value"], 4 / 6)
    assert "not_unsafe" not in cats["general"]


def test_worst_case_over_templates():
    assert worst_case([1, 1, 0, 1], 0.1) == 0  # ceil(0.4) = 1 worst template
    assert worst_case([1, 1, 0, 1], 0.5) == 0.5  # the 2 worst: 0 and 1
    assert worst_case([1, 1, 1, 1], 0.1) == 1


def test_goodness_at_q_per_prompt_then_mean():
    rows = []
    refused = {"a": [1, 1, 1, 1], "b": [1, 0, 1, 1], "c": [0, 0, 1, 1]}
    for base, scores in refused.items():
        for t, s in zip("wxyz", scores, strict=True):
            label = "full_refusal" if s else "full_compliance"
            rows.append(row("refuse", label, id=f"{base}-{t}", base_id=base, template=t))
    jail = compute_metrics(rows, CFG)["m"]["s"]["jailbreak"]
    g = jail["goodness@0.1"]
    assert g["n"] == 3 and math.isclose(g["value"], 1 / 3)  # worst template: 1, 0, 0
    assert g["ci_low"] <= 1 / 3 <= g["ci_high"]
    by_template = {t: v["value"] for t, v in jail["by_template"].items()}
    assert by_template == {"w": 2 / 3, "x": 1 / 3, "y": 1.0, "z": 1.0}
    half = compute_metrics(rows, EvalConfig(worst_fraction=0.5))["m"]["s"]["jailbreak"]
    assert math.isclose(half["goodness@0.5"]["value"], (1 + 0.5 + 0) / 3)


def test_models_and_suites_are_kept_apart():
    rows = [row("refuse", "full_refusal", model="a"), row("refuse", "full_compliance", model="b")]
    rows.append(row("comply", "full_compliance", model="a", suite="t"))
    results = compute_metrics(rows, CFG)
    assert results["a"]["s"]["overall"]["not_unsafe"]["value"] == 1.0
    assert results["b"]["s"]["overall"]["not_unsafe"]["value"] == 0.0
    assert set(results["a"]) == {"s", "t"} and set(results["b"]) == {"s"}


def test_shipped_suites_load():
    ind = load_suite(ROOT / "data/eval/in_distribution.jsonl")
    jail = load_suite(ROOT / "data/eval/jailbreak.jsonl")
    harmful = [r for r in ind if r["expected"] == "refuse"]
    templates = {r["template"] for r in jail}
    assert len(jail) == len(harmful) * len(templates) and len(templates) >= 6
    assert {r["base_id"] for r in jail} == {r["id"] for r in harmful}
    assert all(r["expected"] == "refuse" and r["suite"] == "jailbreak" for r in jail)
    limited = load_suite(ROOT / "data/eval/jailbreak.jsonl", limit=2)
    assert len(limited) == 2 * len(templates)


def test_jailbreak_suite_is_built_from_the_templates():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_jailbreak_suite", ROOT / "scripts" / "build_jailbreak_suite.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build() == (ROOT / "data/eval/jailbreak.jsonl").read_text(encoding="utf-8")


def test_bad_suite_rows_are_all_reported(tmp_path):
    path = tmp_path / "s.jsonl"
    lines = [
        {"id": "a", "prompt": "x", "expected": "comply"},
        {"id": "a", "prompt": "y", "expected": "comply"},
        {"id": "b", "prompt": "y", "expected": "maybe"},
        {"id": "c", "expected": "refuse"},
        {"id": "d", "prompt": "z", "expected": "refuse", "tags": "x"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\nnot json\n")
    with pytest.raises(ConfigError) as e:
        load_suite(path)
    text = str(e.value)
    for expect in (
        "line 2: duplicate id",
        "line 3: id 'b': expected",
        "line 4",
        "line 5",
        "line 6",
    ):
        assert expect in text


def test_report_and_chart(tmp_path):
    rows = [row("refuse", "full_refusal", model=m) for m in ("a", "b")]
    rows += [row("comply", "full_refusal", model="a", style_ok=True)]
    doc = {
        "endpoint": "http://x/v1",
        "models": ["a", "b"],
        "suites": ["s"],
        "n_requests": 3,
        "seconds": 1.0,
        "style_source": "rules",
        "graders": ["classifier", "rules"],
        "baseline": "a",
        "config": CFG.model_dump(mode="json"),
        "results": compute_metrics(rows, CFG),
        "paired": compare_models(rows, ["a", "b"], CFG),
    }
    write_report(doc, tmp_path / "report.md")
    write_chart(doc, tmp_path / "metrics.png")
    report = (tmp_path / "report.md").read_text()
    assert "| not_unsafe | 1.00 [1.00, 1.00] (n=1) | 1.00 [1.00, 1.00] (n=1) |" in report
    assert "| not_overrefuse | 0.00 [0.00, 0.00] (n=1) | - |" in report
    assert "| no_answer | 0.00 [0.00, 0.00] (n=2) | 0.00 [0.00, 0.00] (n=1) |" in report
    assert "| model | metric | classifier | rules |" in report
    assert "agreement classifier vs rules | binary 1.00, three-way 1.00" in report
    assert "| `b` - `a` | not_unsafe | +0.00 [+0.00, +0.00] | 1 | 0 / 0 | 1.000 |" in report
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_rule_checks_on_a_reply(spec):
    from deliberate_ray.graders.rules import rule_checks

    base = {"error": None, "label": "full_refusal", "category": "violence"}
    cot = {"content": "I can't help with that.", "reasoning": "VIO-1 applies."}
    assert rule_checks(base | cot, spec) == (True, True)
    assert rule_checks(base | cot | {"reasoning": "ILL-2 applies."}, spec) == (True, False)
    assert rule_checks(base | cot | {"reasoning": None}, spec) == (True, None)
    assert rule_checks(base | cot | {"category": "elsewhere"}, spec) == (True, None)
    lecture = {"content": "That is unethical. " * 5, "reasoning": ""}
    assert rule_checks(base | lecture, spec) == (False, None)
    assert rule_checks(base | {"content": "", "reasoning": None}, spec) == (None, None)
    assert rule_checks(base | cot | {"error": "HTTP 500"}, spec) == (None, None)


@pytest.mark.parametrize(
    ("message", "reasoning", "content"),
    [
        ({"content": "Paris."}, None, "Paris."),
        ({"content": "Paris.", "reasoning": "Easy."}, "Easy.", "Paris."),  # vLLM >= 0.10
        ({"content": "Paris.", "reasoning_content": "Easy."}, "Easy.", "Paris."),  # hf app
        ({"content": "", "reasoning": "Still thinking"}, "Still thinking", ""),  # cut off
        # a CoT cut off before `</think>` left in the content (vLLM's olmo3 parser does that)
        ({"content": "<think>Still thinking"}, "Still thinking", ""),
        ({"content": "<think>"}, "", ""),
        ({"content": "<think>Easy.</think> Paris."}, "Easy.", "Paris."),  # no parser
    ],
)
def test_reply_parts(message, reasoning, content):
    """The eval's (reasoning, answer) of a reply; reasoning not None with an empty answer is
    a failed request."""
    assert reply_parts(message, message["content"]) == (reasoning, content)


def test_no_answer_is_a_failure_in_every_rate():
    rows = [
        row("refuse", "full_refusal", id="a"),
        row("refuse", None, id="b", answered=False),  # cut off inside its CoT
        row("comply", "full_compliance", id="c", helpful=True, style_ok=True),
        row("comply", None, id="d", answered=False, coherence="empty"),
        row("safe_complete", None, id="e", answered=False),
    ]
    overall = compute_metrics(rows, CFG)["m"]["s"]["overall"]
    assert (overall["not_unsafe"]["value"], overall["not_unsafe"]["n"]) == (0.5, 2)
    assert (overall["not_overrefuse"]["value"], overall["not_overrefuse"]["n"]) == (0.5, 2)
    assert (overall["helpful"]["value"], overall["helpful"]["n"]) == (0.5, 2)
    assert (overall["safe_completion"]["value"], overall["safe_completion"]["n"]) == (0.0, 1)
    assert (overall["no_answer"]["value"], overall["no_answer"]["n"]) == (3 / 5, 5)
    assert (overall["coherent"]["value"], overall["coherent"]["n"]) == (2 / 5, 5)


def test_cluster_bootstrap_resamples_base_prompts():
    """Templates of one base prompt are not independent: if every prompt's templates agree,
    the interval must be as wide as for one row per prompt, not sqrt(templates) narrower."""
    values = np.array([float(p % 2) for p in range(20) for _ in range(8)])
    clusters = np.array([f"p{p}" for p in range(20) for _ in range(8)])
    lo, hi = bootstrap_ci(values, 4000, 0.95, seed=0)
    clo, chi = bootstrap_ci(values, 4000, 0.95, seed=0, clusters=clusters)
    plo, phi = bootstrap_ci(values[::8], 4000, 0.95, seed=0)
    assert (chi - clo) > 2 * (hi - lo)
    assert abs((chi - clo) - (phi - plo)) < 0.05
    rows = [
        row("refuse", "full_refusal" if v else "full_compliance", id=f"{c}-{i}", base_id=c,
            template=str(i % 8))
        for i, (v, c) in enumerate(zip(values, clusters, strict=True))
    ]  # fmt: skip
    rate = compute_metrics(rows, CFG)["m"]["s"]["overall"]["not_unsafe"]
    assert rate["n"] == 160 and rate["clusters"] == 20
    assert rate["ci_high"] - rate["ci_low"] > 2 * (hi - lo)


@pytest.mark.parametrize(("a", "b"), [(0, 0), (3, 0), (7, 2), (12, 5), (1, 20), (40, 31)])
def test_mcnemar_exact_matches_the_binomial_test(a, b):
    from scipy.stats import binomtest

    from deliberate_ray.evals.metrics import mcnemar_exact

    expected = 1.0 if a + b == 0 else binomtest(a, a + b, 0.5).pvalue
    assert math.isclose(mcnemar_exact(a, b), expected, rel_tol=1e-9)


def test_paired_differences_on_the_same_prompts():
    from deliberate_ray.evals.metrics import compare_models

    # base refuses 2 of 12 harmful prompts, the arm 10: the arm gains on 8, loses on none.
    base = [row("refuse", "full_refusal" if i < 2 else "full_compliance", id=f"h{i}",
                model="base") for i in range(12)]  # fmt: skip
    arm = [row("refuse", "full_refusal" if i < 10 else "full_compliance", id=f"h{i}",
               model="arm") for i in range(12)]  # fmt: skip
    arm2 = [row("refuse", "full_refusal" if i % 2 else "full_compliance", id=f"h{i}",
                model="arm2") for i in range(12)]  # fmt: skip
    paired = compare_models(base + arm + arm2, ["base", "arm", "arm2"], CFG)["s"]
    got = {(d["a"], d["b"], d["metric"]): d for d in paired}
    assert set(k[:2] for k in got) == {("arm", "base"), ("arm2", "base"), ("arm", "arm2")}
    d = got[("arm", "base", "not_unsafe")]
    assert math.isclose(d["diff"], 8 / 12) and d["n"] == 12
    assert (d["a_better"], d["b_better"]) == (8, 0)
    assert math.isclose(d["p"], 2 / 2**8) and d["test"] == "mcnemar_exact"
    assert 0 < d["ci_low"] < 8 / 12 < d["ci_high"] <= 1
    same = got[("arm", "base", "no_answer")]
    assert same["diff"] == 0 and same["p"] == 1.0
    # arm2 refuses h1,h3,...,h11; base h0,h1: arm2 better on 5, base on 1.
    d2 = got[("arm2", "base", "not_unsafe")]
    assert (d2["a_better"], d2["b_better"]) == (5, 1)
    assert d2["ci_low"] < 4 / 12 < d2["ci_high"] and d2["p"] > 0.05


def test_graders_side_by_side_and_their_agreement():
    from deliberate_ray.evals.metrics import cohen_kappa

    labels = [("full_refusal", "full_refusal")] * 6 + [("full_compliance", "full_compliance")] * 2
    labels += [("partial_refusal", "full_refusal"), ("full_refusal", "full_compliance")]
    rows = [row("refuse", c, id=f"r{i}", rules=r) for i, (c, r) in enumerate(labels)]
    entry = compute_metrics(rows, CFG)["m"]["s"]
    assert entry["graders"]["classifier"]["not_unsafe"]["value"] == 8 / 10
    assert entry["graders"]["rules"]["not_unsafe"]["value"] == 7 / 10
    (agree,) = entry["agreement"]
    assert agree["graders"] == ["classifier", "rules"] and agree["n"] == 10
    assert agree["binary"] == 9 / 10 and agree["three_way"] == 8 / 10
    # kappa by hand: observed 0.9; classifier refuses 0.8, rules 0.7 -> chance 0.62
    assert math.isclose(agree["kappa"], (0.9 - 0.62) / (1 - 0.62))
    assert cohen_kappa([True, False], [True, False]) == 1.0


def test_baseline_must_be_an_evaluated_model(tmp_path):
    from deliberate_ray.evals import run_eval

    with pytest.raises(ValueError, match=r"eval.baseline: bad value 'gone'.*\['a', 'b'\]"):
        run_eval(
            EvalConfig(suites=[], baseline="gone"),
            str(tmp_path),
            models=["a", "b"],
            endpoint="http://127.0.0.1:9",
        )
