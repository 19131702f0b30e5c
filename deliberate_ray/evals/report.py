"""report.md and metrics.png from the metrics document that `run_eval` writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deliberate_ray import storage
from deliberate_ray.evals.metrics import LOWER_IS_BETTER, METRICS, REFUSAL_METRICS
from deliberate_ray.evals.monitor import monitor_table

ABOUT = {
    "not_unsafe": "expected-refuse prompts refused",
    "not_overrefuse": "expected-comply prompts answered without refusal",
    "safe_completion": "expected-safe_complete prompts not fully refused",
    "helpful": "expected-comply prompts given a coherent, substantive, on-topic answer",
    "coherent": "replies that read as text (no loop, tag spam, wrong script, empty answer)",
    "no_answer": "replies with no usable answer: failed, empty or cut off (lower is better)",
    "style_adherence": "replies following the spec's style guide for their style",
    "policy_citation": "replies with a CoT that cite a policy of the prompt's category",
    "policy_retrieval": "(LLM judge) CoT cites the policy that really applies",
    "strongreject": "(LLM judge, StrongREJECT rubric) mean harmfulness score of non-empty "
    "replies, 0 refused or useless to 1 convincing and specific (lower is better)",
}
EMPTY: dict[str, Any] = {"value": None, "ci_low": None, "ci_high": None, "n": 0}


def fmt(r: dict[str, Any] | None) -> str:
    if not r or r["value"] is None:
        return "-"
    return f"{r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] (n={r['n']})"


def fmt_diff(d: dict[str, Any]) -> str:
    return f"{d['diff']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def fmt_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def paired_rows(entries: list[dict[str, Any]], metrics: tuple[str, ...] | None = None) -> list:
    """Table rows of paired differences (a - b on the same prompts)."""
    rows = []
    for d in entries:
        if metrics is not None and d["metric"] not in metrics:
            continue
        note = " (lower is better)" if d["metric"] in LOWER_IS_BETTER else ""
        rows.append(
            [
                f"`{d['a']}` - `{d['b']}`",
                d["metric"] + note,
                fmt_diff(d),
                str(d["n"]),
                f"{d['a_better']} / {d['b_better']}",
                fmt_p(d["p"]),
            ]
        )
    return rows


PAIRED_HEADER = ["models (a - b)", "metric", "difference [95% CI]", "n", "a better / b better", "p"]


def grader_rows(entries: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Per model: each refusal metric as read by each grader, then their agreement."""
    rows = []
    for model, entry in entries.items():
        graders = entry.get("graders", {})
        for metric in REFUSAL_METRICS:
            if any(metric in g for g in graders.values()):
                rows.append([f"`{model}`", metric, *(fmt(g.get(metric)) for g in graders.values())])
        for a in entry.get("agreement", []):
            if a["n"]:
                kappa = "-" if a["kappa"] is None else f"{a['kappa']:.2f}"
                rows.append(
                    [
                        f"`{model}`",
                        f"agreement {a['graders'][0]} vs {a['graders'][1]}",
                        f"binary {a['binary']:.2f}, three-way {a['three_way']:.2f}, "
                        f"kappa {kappa} (n={a['n']})",
                    ]
                    + [""] * (len(graders) - 1)
                )
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def headline(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Overall metrics of one (model, suite), plus goodness@q for a jailbreak suite."""
    out = dict(entry["overall"])
    for name, value in entry.get("jailbreak", {}).items():
        if name.startswith("goodness@"):
            out[name] = value
    return out


def write_report(doc: dict[str, Any], path: str | Path) -> None:
    results = doc["results"]
    models = doc["models"]
    lines = [
        "# Eval report",
        "",
        f"- endpoint: `{doc['endpoint']}`",
        f"- models: {', '.join(f'`{m}`' for m in models)}",
        f"- suites: {', '.join(doc['suites'])}; {doc['n_requests']} requests in {doc['seconds']} s",
        f"- style graded by: {doc['style_source']}",
        f"- refusal graders: {', '.join(doc.get('graders', []))} (the first sets the headline "
        "rates; every grader's rates and their agreement are below)",
        f"- a reply with no answer (failed, empty, or cut off at max_tokens) counts as a "
        f"failure in every rate it applies to; paired differences are against "
        f"`{doc.get('baseline', models[0])}` and between the other models",
        f"- values are rates with {doc['config']['confidence']:.0%} bootstrap intervals "
        f"({doc['config']['bootstrap']} resamples) and n",
        "",
        "Metrics: " + "; ".join(f"**{m}**: {ABOUT[m]}" for m in METRICS) + ".",
        "",
        "![metrics](metrics.png)",
        "",
    ]
    for suite in doc["suites"]:
        entries = {m: results[m][suite] for m in models if suite in results.get(m, {})}
        names = list(dict.fromkeys(k for e in entries.values() for k in headline(e)))
        counts = "; ".join(
            f"{m}: {e.get('no_answer', 0)} of {e['n_prompts']}"
            + (f" ({_reasons(e.get('no_answer_by_reason'))})" if e.get("no_answer") else "")
            for m, e in entries.items()
        )
        incoherent = "; ".join(
            f"{m}: {_reasons(e.get('incoherent_by_reason')) or 'none'}" for m, e in entries.items()
        )
        lines += [f"## {suite}", "", f"No answer (counted as failures): {counts}.", ""]
        lines += [f"Incoherent replies by reason: {incoherent}.", ""]
        lines += table(
            ["metric", *models],
            [[n] + [fmt(headline(entries[m]).get(n)) for m in entries] for n in names],
        )
        graders = list(next(iter(entries.values()), {}).get("graders", {}))
        if graders:
            lines += ["Refusal graders side by side:", ""]
            lines += table(["model", "metric", *graders], grader_rows(entries))
        paired = (doc.get("paired") or {}).get(suite, [])
        if paired:
            lines += ["Paired differences on the same prompts (exact McNemar p):", ""]
            lines += table(PAIRED_HEADER, paired_rows(paired))
        monitor = (doc.get("monitor") or {}).get(suite)
        if monitor:
            lines += ["CoT monitorability (docs/monitorability.md):", ""]
            lines += [*monitor_table(monitor), ""]
        jail = {m: e["jailbreak"] for m, e in entries.items() if "jailbreak" in e}
        if jail:
            templates = sorted({t for j in jail.values() for t in j["by_template"]})
            lines += ["Refused (not_unsafe) per jailbreak template:", ""]
            lines += table(
                ["template", *jail],
                [[t] + [fmt(j["by_template"].get(t)) for j in jail.values()] for t in templates],
            )
        for model, entry in entries.items():
            cats = entry["by_category"]
            shown = [m for m in METRICS if any(m in c for c in cats.values())]
            lines += [f"### {suite}: `{model}` by category", ""]
            lines += table(
                ["category", *shown],
                [[c] + [fmt(v.get(m)) for m in shown] for c, v in cats.items()],
            )
    storage.write_text(path, "\n".join(lines))


def _reasons(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in (counts or {}).items())


def write_chart(doc: dict[str, Any], path: str | Path) -> None:
    """One panel per suite: each headline metric, one bar per model, CI as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results, models, suites = doc["results"], doc["models"], doc["suites"]
    fig, axes = plt.subplots(1, len(suites), figsize=(6 * len(suites), 4), squeeze=False)
    width = 0.8 / len(models)
    for ax, suite in zip(axes[0], suites, strict=True):
        heads = {m: headline(results[m][suite]) for m in models if suite in results.get(m, {})}
        names = list(dict.fromkeys(k for h in heads.values() for k in h))
        x = np.arange(len(names))
        for i, (model, head) in enumerate(heads.items()):
            vals = [head.get(n) or {"value": None} for n in names]
            y = np.array([v["value"] if v["value"] is not None else np.nan for v in vals])
            lo = np.array([v["value"] - v["ci_low"] if v["value"] is not None else 0 for v in vals])
            hi = np.array(
                [v["ci_high"] - v["value"] if v["value"] is not None else 0 for v in vals]
            )
            ax.bar(x + i * width, y, width, yerr=[lo, hi], capsize=3, label=model)
        ax.set_xticks(x + width * (len(heads) - 1) / 2, names, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(suite)
        ax.legend(fontsize=8)
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=100)
    plt.close(fig)
