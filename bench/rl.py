"""Where an RL iteration's time goes: rollout (engine start with the current policy + the
rollouts and held-in replies), reward (programmatic checks + the LLM judge's engine), update
(the Ray Train fit: worker start, pi_old and reference log probabilities, the GRPO steps,
the checkpoint) and weight sync (the checkpoint exported as the HF folder the next engine
loads; on CPU the load itself is part of the next rollout's engine start). Also rollout
tokens per second (generated tokens of rollouts and held-in replies over the rollout phase).

Runs the rl stage (`deliberate_ray.rl.run_rl`) on a config (the embedded default,
configs/rl.yaml, which starts from the demo's `cot` export) into a fresh output folder, then
reads its
metrics.jsonl and writes bench/results/rl.json (with the run's report as rl_report.md and
its reward curve as rl_reward_curve.png).

    .venv/bin/python bench/rl.py                        # configs/rl.yaml, its iterations
    .venv/bin/python bench/rl.py --iterations 2 --init-model runs/demo/train/cot/export
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deliberate_ray.config import load_config, override  # noqa: E402
from deliberate_ray.pipeline import run_stage  # noqa: E402

PHASES = ("rollout", "reward", "update", "sync")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "rl.yaml"))
    p.add_argument("--iterations", type=int, default=None, help="default: the config's")
    p.add_argument("--init-model", default=None, help="default: the config's (the arm's export)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rl.json")
    a = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import ray

    cfg = load_config(a.config)
    assert cfg.rl is not None, f"{a.config} has no rl: section"
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="bench-rl-"))
    sft_export = Path(cfg.run_dir) / "train" / cfg.rl.arm / "export"
    init = a.init_model or cfg.rl.init_model or str(sft_export)
    rl = override(
        cfg.rl, "rl", iterations=a.iterations, init_model=init, output_dir=str(workdir / "rl")
    )
    cfg = override(cfg, "config", rl=rl)
    ray.init()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    summary = run_stage(cfg, "rl")
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in Path(summary.metrics_path).read_text().splitlines()]
    iterations = []
    for r in rows:
        t = r["time_s"]
        iterations.append(
            {
                "iteration": r["iteration"],
                **{f"{k}_s": t[k] for k in PHASES},
                "iteration_s": t["iteration"],
                "rollout_tokens": r["rollout_tokens"],
                "rollout_tokens_per_s": r["rollout_tokens_per_s"],
                "reward_mean": r["reward_mean"],
                "kl": r["kl"],
                "update_steps": r["update_steps"],
            }
        )
    totals = {k: sum(i[f"{k}_s"] for i in iterations) for k in PHASES}
    all_s = sum(totals.values()) or 1.0
    out = {
        "config": a.config,
        "init_model": summary.init_model,
        "rollout_engine": rl.engine.kind,
        "judge_engine": rl.reward.judge.engine.kind if rl.reward.judge.enabled else None,
        "rollouts_per_iteration": rl.prompts_per_iteration * rl.group_size,
        "heldin_prompts": rl.heldin_prompts,
        "max_tokens": rl.sampling.max_tokens,
        "cpu_count": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "wall_s": round(wall, 1),
        "iterations": iterations,
        "phase_totals_s": {k: round(v, 1) for k, v in totals.items()},
        "phase_share": {k: round(v / all_s, 3) for k, v in totals.items()},
        "rollout_tokens_per_s_mean": sum(i["rollout_tokens_per_s"] or 0 for i in iterations)
        / max(1, len(iterations)),
        "reward_curve": summary.reward_curve,
        "heldin_before": summary.heldin_before,
        "heldin_after": summary.heldin_after,
        "report": summary.report,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    # The run's report and reward curve beside the numbers (the run folder may be temporary).
    report = Path(summary.report)
    curve = a.out.with_name(a.out.stem + "_reward_curve.png")
    if (report.parent / "reward_curve.png").exists():
        shutil.copyfile(report.parent / "reward_curve.png", curve)
    text = report.read_text().replace("(reward_curve.png)", f"({curve.name})")
    a.out.with_name(a.out.stem + "_report.md").write_text(text)
    print(json.dumps({k: out[k] for k in ("wall_s", "phase_totals_s", "phase_share")}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
