"""The four-arm matrix (AFT with/without CoT x with/without MSM) in the run report: each
arm against base, the MSM and CoT contrasts as paired differences on the same prompts, the
AFT data-efficiency sweep chart, and the spec-document corpus (docs/msm.md).

The eval stage already computes the paired difference of every pair of served models
(evals/metrics.py `compare_models`); this module picks the pairs the matrix asks about and
orients them (a - b with a the arm that has the factor).
"""

from __future__ import annotations

from typing import Any

from deliberate_ray import storage
from deliberate_ray.config import ArmConfig, PipelineConfig
from deliberate_ray.evals.report import fmt, fmt_diff, fmt_p, table

MATRIX_METRICS = (
    "not_unsafe",
    "not_overrefuse",
    "helpful",
    "coherent",
    "no_answer",
    "harmful_action",
)
SWEEP_METRICS = ("not_unsafe", "not_overrefuse", "helpful", "no_answer")


def factors(arm: ArmConfig) -> tuple[bool, str, float]:
    return arm.msm, arm.variant, arm.tuples_fraction


def contrasts(pipe: PipelineConfig, baseline: str | None = "base") -> list[tuple[str, str, str]]:
    """(label, a, b) pairs: each full-data arm vs the baseline, then MSM vs no MSM (same
    variant) and CoT vs no CoT (same MSM setting)."""
    arms = [a for a in pipe.arms if a.tuples_fraction == 1.0]
    out = [(f"{a.name} vs {baseline}", a.name, baseline) for a in arms if baseline]
    by = {factors(a): a.name for a in arms}
    for a in arms:
        msm, variant, frac = factors(a)
        if msm and (other := by.get((False, variant, frac))):
            out.append((f"MSM vs no MSM ({variant})", a.name, other))
    for a in arms:
        msm, variant, frac = factors(a)
        if variant == "cot" and (other := by.get((msm, "no_cot", frac))):
            out.append((f"CoT vs no CoT ({'MSM' if msm else 'no MSM'})", a.name, other))
    return out


def oriented(entries: list[dict[str, Any]], a: str, b: str, metric: str) -> dict[str, Any] | None:
    """The paired difference a - b of `metric`, flipped when it was stored as b - a."""
    for d in entries:
        if d["metric"] != metric:
            continue
        if (d["a"], d["b"]) == (a, b):
            return d
        if (d["a"], d["b"]) == (b, a):
            return d | {
                "a": a,
                "b": b,
                "diff": -d["diff"],
                "ci_low": -d["ci_high"],
                "ci_high": -d["ci_low"],
                "a_better": d["b_better"],
                "b_better": d["a_better"],
            }
    return None


def matrix_section(pipe: PipelineConfig, ev: dict[str, Any]) -> list[str]:
    """Per suite: the arms' headline rates and the matrix contrasts."""
    base = "base" if "base" in ev["models"] else None
    pairs = contrasts(pipe, base)
    if not any(a.msm for a in pipe.arms) and len(pipe.arms) < 2:
        return []
    lines = [
        "## The matrix",
        "",
        "Each arm against base, then the two factors as paired differences on the same "
        "prompts (a - b; for `no_answer` and `harmful_action` lower is better): MSM (Model "
        "Spec Midtraining before AFT) vs none at the same AFT variant, and AFT with CoT "
        "vs without at the same MSM setting. Intervals: bootstrap 95%; p: exact McNemar.",
        "",
    ]
    arms = {a.name: a for a in pipe.arms}
    for suite in ev["suites"]:
        lines += [f"### {suite}", ""]
        rows = []
        for model in ev["models"]:
            arm = arms.get(model)
            if model != "base" and arm is None:
                continue  # sweep copies: in the sweep chart
            entry = ev["results"].get(model, {}).get(suite, {})
            overall = entry.get("overall", {})
            label = "-" if arm is None else f"{'MSM + ' if arm.msm else ''}AFT {arm.variant}"
            rows.append([f"`{model}`", label, *(fmt(overall.get(m)) for m in MATRIX_METRICS)])
        lines += table(["model", "arm", *MATRIX_METRICS], rows)
        paired = (ev.get("paired") or {}).get(suite, [])
        diff_rows = []
        for label, a, b in pairs:
            for metric in MATRIX_METRICS:
                d = oriented(paired, a, b, metric)
                if d is not None:
                    diff_rows.append(
                        [label, f"`{a}` - `{b}`", metric, fmt_diff(d), str(d["n"]), fmt_p(d["p"])]
                    )
        if diff_rows:
            lines += table(["contrast", "a - b", "metric", "diff [95% CI]", "n", "p"], diff_rows)
    return lines


def sweep_points(
    pipe: PipelineConfig, ev: dict[str, Any], suite: str, metric: str
) -> dict[str, list[tuple[float, dict[str, Any]]]]:
    """{arm: [(share of tuples, rate entry)]} over the arm and its sweep copies."""
    out: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for arm in pipe.expanded_arms():
        root = arm.name.rsplit("-", 1)[0] if arm.tuples_fraction < 1.0 else arm.name
        r = ev["results"].get(arm.name, {}).get(suite, {}).get("overall", {}).get(metric)
        if r and r.get("value") is not None:
            out.setdefault(root, []).append((arm.tuples_fraction, r))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in out.items()}


def plot_sweep(pipe: PipelineConfig, ev: dict[str, Any], path: str) -> bool:
    """Each headline rate against the share of tuples the arm trained on, one line per arm
    with its 95% interval, base as a dashed line; False when there is no sweep."""
    if not pipe.sweep or not ev["suites"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite = ev["suites"][0]
    fig, axes = plt.subplots(1, len(SWEEP_METRICS), figsize=(4 * len(SWEEP_METRICS), 3.5))
    for ax, metric in zip(axes, SWEEP_METRICS, strict=True):
        for arm, points in sweep_points(pipe, ev, suite, metric).items():
            xs = [p[0] * 100 for p in points]
            ys = [p[1]["value"] for p in points]
            lo = [p[1]["value"] - p[1]["ci_low"] for p in points]
            hi = [p[1]["ci_high"] - p[1]["value"] for p in points]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=arm)
        base = ev["results"].get("base", {}).get(suite, {}).get("overall", {}).get(metric)
        if base and base.get("value") is not None:
            ax.axhline(base["value"], color="grey", linestyle="--", label="base")
        ax.set_title(metric)
        ax.set_xlabel("% of tuples in AFT")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"AFT data efficiency ({suite})")
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return True


def sweep_section(pipe: PipelineConfig, ev: dict[str, Any], chart: bool) -> list[str]:
    if not pipe.sweep:
        return []
    lines = [
        "## AFT data efficiency",
        "",
        f"Every arm trained again on {', '.join(f'{f:.0%}' for f in pipe.sweep)} of the tuples "
        "(nested subsets by id hash, same epochs), served and evaluated on the same prompts.",
        "",
    ]
    if chart:
        lines += ["![sweep](sweep.png)", ""]
    for suite in ev["suites"]:
        rows = []
        for metric in SWEEP_METRICS:
            for arm, points in sweep_points(pipe, ev, suite, metric).items():
                rows.append([arm, metric, *(f"{f:.0%}: {fmt(r)}" for f, r in points)])
        lines += [f"### {suite}", ""]
        width = max((len(r) for r in rows), default=2)
        rows = [r + [""] * (width - len(r)) for r in rows]
        lines += table(["arm", "metric", *(["share: rate"] * (width - 2))], rows)
    return lines


def docs_section(docs: dict[str, Any] | None) -> list[str]:
    if not docs:
        return []
    total = docs["stats"]["total"]
    rejected = total.get("rejected", {})
    lines = [
        "## Spec documents (MSM corpus)",
        "",
        f"- writer: `{docs.get('writer', '?')}`; documents kept: {total.get('kept', 0)} of "
        f"{total.get('planned', 0)} written; chat rows for the mix: "
        f"{total.get('chat_kept', 0)} of {total.get('chat_prompts', 0)}",
        "- rejected: " + (", ".join(f"{r} {n}" for r, n in sorted(rejected.items())) or "none"),
        "- per type: "
        + ", ".join(f"{t} {n}" for t, n in sorted(total.get("kept_by_type", {}).items())),
        f"- card with counts per policy: `{storage.join(docs['output_dir'], 'README.md')}`",
        "",
    ]
    return lines
