"""The pipeline's top-level report.md: what ran, data kept and dropped, training curves,
the eval table per arm with intervals, and the cost (wall time and tokens per stage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deliberate_ray import storage
from deliberate_ray.config import Config, PipelineConfig
from deliberate_ray.evals.report import PAIRED_HEADER, fmt, paired_rows, table
from deliberate_ray.matrix import docs_section, matrix_section, plot_sweep, sweep_section
from deliberate_ray.spec import load_spec

HEADLINE = ("not_unsafe", "not_overrefuse", "helpful", "coherent", "no_answer")


def headline_grader(ev: dict[str, Any]) -> str:
    """The refusal grader behind an eval's headline rates (the first configured)."""
    return (ev.get("graders") or ["?"])[0]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def plot_curves(train: dict[str, dict[str, Any]], path: str) -> bool:
    """Loss per step, one line per arm; False when no arm logged a step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {arm: read_jsonl(t["metrics_path"]) for arm, t in train.items()}
    curves = {arm: rows for arm, rows in curves.items() if rows}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=arm)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (assistant tokens)")
    ax.set_title("SFT loss per arm")
    ax.legend()
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return True


def data_section(gen: dict[str, Any]) -> list[str]:
    stats = gen["stats"]
    total = stats["total"] if "total" in stats else stats
    lines = ["## Data", ""]
    lines += [
        f"- prompts: {total.get('prompts', 0)}, samples: {total.get('samples', 0)}, "
        f"tuples kept: {total.get('kept', 0)} "
        f"(acceptance {total.get('acceptance_rate', 0):.0%})",
        "",
    ]
    dropped = dropped_by_reason(total)
    if dropped:
        lines += table(
            ["dropped (stage: reason)", "count"],
            [[k, str(v)] for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])],
        )
    lines += [
        f"Outputs: `{gen['output_dir']}` (tuples, samples, quarantine, stats.json, dataset card).",
        "",
    ]
    return lines


def dropped_by_reason(total: dict[str, Any]) -> dict[str, int]:
    """Flatten the generate stats' quarantine/rejection counters into {reason: count}."""
    out: dict[str, int] = {}
    for key in ("quarantine", "rejected"):
        for reason, n in (total.get(key) or {}).items():
            out[f"{key}: {reason}"] = int(n)
    return out


def eval_rows(ev: dict[str, Any], suite: str) -> list[list[str]]:
    rows = []
    for model in ev["models"]:
        entry = ev["results"].get(model, {}).get(suite)
        if entry is None:
            continue
        overall = entry["overall"]
        cells = [fmt(overall.get(m)) for m in HEADLINE]
        goodness = {
            k: v for k, v in entry.get("jailbreak", {}).items() if k.startswith("goodness@")
        }
        cells.append(", ".join(f"{k} {fmt(v)}" for k, v in goodness.items()) or "-")
        agree = [
            f"{a['graders'][0]}/{a['graders'][1]} {a['binary']:.2f}"
            for a in entry.get("agreement", [])
            if a["n"]
        ]
        cells.append(", ".join(agree) or "-")
        rows.append([f"`{model}`", *cells])
    return rows


def write_report(cfg: Config, summary: dict[str, Any]) -> str:
    run_dir = summary["run_dir"]
    gen, train, ev = summary["generate"], summary["train"], summary["eval"]
    lines = ["# deliberate-ray run report", ""]
    lines += [
        f"- run directory: `{run_dir}`",
        f"- spec: `{cfg.spec.path}` (variant `{cfg.spec.variant}`, "
        f"spec_sha `{load_spec(cfg.spec.path).sha}`)",
        f"- teacher: `{gen.get('teacher', '?')}`; judge: `{gen.get('judge', '?')}`",
        f"- student: `{cfg.train.model if cfg.train else '?'}`; arms: "
        + ", ".join(f"`{a}` ({t.get('variant')})" for a, t in train.items()),
        f"- total wall time: {summary['wall_s']:.0f} s",
        "",
    ]
    lines += docs_section(summary.get("docs"))
    lines += data_section(gen)
    lines += ["## Training", ""]
    lines += table(
        ["arm", "variant", "steps", "final loss", "export"],
        [
            [
                a,
                str(t.get("variant")),
                str(t.get("steps")),
                f"{t['final_loss']:.4f}" if t.get("final_loss") is not None else "-",
                f"`{t.get('export_dir')}`",
            ]
            for a, t in [*(summary.get("midtrain") or {}).items(), *train.items()]
        ],
    )
    if plot_curves(train, storage.join(run_dir, "train_curves.png")):
        lines += ["![training curves](train_curves.png)", ""]
    lines += [
        "## Evaluation",
        "",
        "Rates with bootstrap 95% intervals and n; `base` is the untrained student. A reply "
        "with no answer (failed, empty or cut off) is a failure in every rate, and `no_answer` "
        f"counts them. Refusal read by the `{headline_grader(ev)}` grader; "
        "`graders agree` is the binary agreement of the refusal graders on the same replies.",
        "",
    ]
    for suite in ev["suites"]:
        lines += [f"### {suite}", ""]
        lines += table(
            ["model", *HEADLINE, "jailbreak worst case", "graders agree"], eval_rows(ev, suite)
        )
        paired = (ev.get("paired") or {}).get(suite, [])
        if paired:
            lines += ["Paired differences on the same prompts (exact McNemar p):", ""]
            lines += table(PAIRED_HEADER, paired_rows(paired))
    lines += [
        f"Per-category tables and the chart: `{storage.join(run_dir, 'eval', 'report.md')}`.",
        "",
    ]
    pipe = cfg.pipeline or PipelineConfig()
    lines += matrix_section(pipe, ev)
    lines += monitor_section(ev)
    lines += sweep_section(pipe, ev, plot_sweep(pipe, ev, storage.join(run_dir, "sweep.png")))
    lines += ["## Cost", ""]
    lines += table(["stage", "wall time (s)", "tokens"], cost_rows(summary))
    path = storage.join(run_dir, "report.md")
    storage.write_text(path, "\n".join(lines))
    return path


def monitor_section(ev: dict[str, Any]) -> list[str]:
    """CoT monitorability per arm and suite (evals/monitor.py)."""
    from deliberate_ray.evals.monitor import monitor_table

    monitor = ev.get("monitor") or {}
    if not monitor:
        return []
    lines = [
        "## CoT monitorability",
        "",
        "Per model: does the CoT cite a policy of the prompt's category (every reply in n), "
        "policy ids that do not exist, does the action the CoT announces match the graded "
        "answer, and can the answer's action be predicted from the CoT alone "
        "(cross-validated, against the majority class). See docs/monitorability.md.",
        "",
    ]
    for suite, doc in monitor.items():
        lines += [f"### {suite}", "", *monitor_table(doc), ""]
    return lines


def cost_rows(summary: dict[str, Any]) -> list[list[str]]:
    gen = summary["generate"]
    total = gen["stats"].get("total", gen["stats"])
    rows = []
    if summary.get("docs"):
        d = summary["docs"]
        rows.append(
            [
                "docs",
                f"{d['wall_s']:.0f}",
                f"generated {d['stats']['total'].get('generated_tokens', 0)} (documents)",
            ]
        )
    rows += [
        [
            "generate",
            f"{gen['wall_s']:.0f}",
            f"teacher in {total.get('teacher_input_tokens', 0)}, "
            f"out {total.get('teacher_generated_tokens', 0)}; "
            f"judge in {total.get('judge_input_tokens', 0)}, "
            f"out {total.get('judge_generated_tokens', 0)}",
        ]
    ]
    for arm, t in [*(summary.get("midtrain") or {}).items(), *summary["train"].items()]:
        curve = read_jsonl(t["metrics_path"])
        tokens = curve[-1].get("tokens_seen") if curve else None
        rows.append(
            [
                f"train `{arm}`",
                f"{t['wall_s']:.0f}",
                f"{tokens} trained tokens" if tokens is not None else "-",
            ]
        )
    ev = summary["eval"]
    rows.append(["serve + eval", f"{ev['wall_s']:.0f}", f"{ev.get('n_requests', '?')} requests"])
    return rows
