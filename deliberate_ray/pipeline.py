"""generate -> train (one run per arm) -> serve (base + arms side by side) -> eval -> report.

`pipeline` only chains the stages; each stage reads and writes its own contract and can run
alone. A stage that finished writes `{run_dir}/stages/{name}.json` (its outputs and wall
time); a rerun skips it. A stage killed midway has no marker, so it runs again and resumes
from its own state: generation skips done prompt ids, training resumes from its latest
checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deliberate_ray.config import ArmConfig, Config, ConfigError, PipelineConfig

log = logging.getLogger(__name__)
STAGE_SECTIONS = ("generate", "train", "serve", "eval")


class Stages:
    """Completion markers of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> dict[str, Any] | None:
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run `fn` unless `name` already finished; record its outputs and wall time."""
        if (prev := self.done(name)) is not None:
            log.info("stage %s: done earlier, skipped (%s)", name, self.dir / f"{name}.json")
            return prev | {"skipped": True}
        log.info("stage %s: starting", name)
        t0 = time.perf_counter()
        result = fn() | {"wall_s": round(time.perf_counter() - t0, 2)}
        tmp = self.dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(self.dir / f"{name}.json")
        log.info("stage %s: finished in %.1f s", name, result["wall_s"])
        return result


def train_arm(cfg: Config, stages: Stages, arm: ArmConfig, tuples: str) -> dict[str, Any]:
    """SFT one arm on the tuples; an MSM arm first midtrains on spec documents."""
    from deliberate_ray.train import run_train

    model = None
    if arm.msm:
        assert cfg.train is not None
        steps = arm.msm_steps or cfg.train.max_steps
        msm_cfg = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"max_steps": steps})}
        )
        msm = stages.run(
            f"train-{arm.name}-msm",
            lambda: run_train(msm_cfg, variant="docs", name=f"{arm.name}-msm", data=arm.msm_docs),
        )
        model = msm["export_dir"]
    return stages.run(
        f"train-{arm.name}",
        lambda: run_train(cfg, variant=arm.variant, name=arm.name, data=[tuples], model=model),
    )


def train_arms(
    cfg: Config, stages: Stages, pipe: PipelineConfig, tuples: str
) -> dict[str, dict[str, Any]]:
    """Every arm, one after another or (`parallel_arms`) at the same time in threads, each
    its own Ray Train run; results in the arms' order, the first failure raised."""
    if not pipe.parallel_arms or len(pipe.arms) < 2:
        return {arm.name: train_arm(cfg, stages, arm, tuples) for arm in pipe.arms}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(pipe.arms), thread_name_prefix="arm") as pool:
        futures = {a.name: pool.submit(train_arm, cfg, stages, a, tuples) for a in pipe.arms}
        return {name: f.result() for name, f in futures.items()}


def run_pipeline(cfg: Config) -> dict[str, Any]:
    from deliberate_ray.evals import run_eval
    from deliberate_ray.generate import run_generate
    from deliberate_ray.report import write_report
    from deliberate_ray.serve import shutdown, start_serve
    from deliberate_ray.serve.launch import run_key

    missing = [s for s in STAGE_SECTIONS if getattr(cfg, s) is None]
    if missing:
        raise ConfigError(
            "config",
            [
                f"{s}: missing section -> the pipeline runs every stage, "
                "add it (see configs/demo.yaml)"
                for s in missing
            ],
        )
    assert cfg.train is not None and cfg.serve is not None and cfg.eval is not None
    pipe = cfg.pipeline or PipelineConfig()
    warn_if_same_grader(cfg)
    run_dir = Path(cfg.run_dir)
    stages = Stages(run_dir)
    t0 = time.perf_counter()

    gen = stages.run("generate", lambda: run_generate(cfg))
    if not gen["stats"]["total"].get("kept"):
        raise RuntimeError(
            f"generation kept no tuples (see {gen['output_dir']}/stats.json); nothing to train on"
        )
    trained = train_arms(cfg, stages, pipe, gen["tuples"])
    models = {"base": cfg.train.model} if pipe.compare_base else {}
    models |= {name: t["export_dir"] for name, t in trained.items()}

    def evaluate() -> dict[str, Any]:
        serve_cfg = cfg.serve.model_copy(update={"models": models})
        key_env = None if serve_cfg.no_auth else serve_cfg.api_key_env
        ev_cfg = cfg.eval.model_copy(
            update={"spec_variant": cfg.spec.variant, "api_key_env": key_env}
        )
        with run_key(serve_cfg):
            url = start_serve(models, serve_cfg)
            try:  # the app goes once the replies are in (the graders need no endpoint)
                return run_eval(
                    cfg.eval.suites, url, list(models), run_dir / "eval", ev_cfg, answered=shutdown
                )
            finally:
                shutdown()

    ev = stages.run("eval", evaluate)
    summary = {
        "run_dir": str(run_dir),
        "generate": gen,
        "train": trained,
        "eval": ev,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    summary["report"] = str(write_report(cfg, summary))
    return summary


def short(r: dict[str, Any] | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    return f"{r['value']:.2f} [{r['ci_low']:.2f},{r['ci_high']:.2f}] {r['n']}"


def warn_if_same_grader(cfg: Config) -> None:
    """The grader that selects training data should not be the one that scores the result."""
    if cfg.generate is None or cfg.eval is None:
        return
    picked, scored = cfg.generate.judge.action_grader, cfg.eval.graders[0]
    if cfg.generate.judge.programmatic and picked == scored:
        log.warning(
            "generate.judge.action_grader and the eval's first grader are both %r: the eval's "
            "headline rates then use the grader that selected the training data",
            picked,
        )


def summary_table(summary: dict[str, Any]) -> str:
    """What the demo prints at the end: data kept/dropped, final losses, base vs arms."""
    from deliberate_ray.report import HEADLINE, dropped_by_reason, headline_grader

    total = summary["generate"]["stats"]["total"]
    lines = [
        "",
        "=" * 78,
        f"tuples kept: {total.get('kept', 0)} of {total.get('prompts', 0)} "
        f"prompts (acceptance {total.get('acceptance_rate', 0):.0%})",
    ]
    for reason, n in sorted(dropped_by_reason(total).items(), key=lambda kv: -kv[1]):
        lines.append(f"  dropped {n:>5}  {reason}")
    for arm, t in summary["train"].items():
        loss = t.get("final_loss")
        lines.append(f"final train loss [{arm}]: {'-' if loss is None else f'{loss:.4f}'}")
    ev = summary["eval"]
    for suite in ev["suites"]:
        grader = headline_grader(ev)
        lines.append(f"{suite} (rate [95% CI] n; no answer = failure; refusal by {grader}):")
        lines.append(
            f"  {'model':<10} " + " ".join(f"{m:<22}" for m in HEADLINE) + " graders agree"
        )
        for model in ev["models"]:
            entry = ev["results"].get(model, {}).get(suite, {})
            overall = entry.get("overall", {})
            agree = entry.get("agreement") or [{}]
            binary = agree[0].get("binary")
            lines.append(
                f"  {model:<10} "
                + " ".join(f"{short(overall.get(m)):<22}" for m in HEADLINE)
                + (f" {binary:.2f}" if binary is not None else " -")
            )
        paired = [
            d
            for d in (ev.get("paired") or {}).get(suite, [])
            if d["b"] == ev.get("baseline") and d["metric"] in HEADLINE
        ]
        for d in paired:
            lines.append(
                f"  {d['a']} - {d['b']:<8} {d['metric']:<15} {d['diff']:+.2f} "
                f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] n={d['n']} p={d['p']:.3g}"
            )
    lines += [f"wall time: {summary['wall_s']:.0f} s", f"report: {summary['report']}", "=" * 78]
    return "\n".join(lines)
