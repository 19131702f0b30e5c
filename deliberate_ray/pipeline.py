"""generate -> train (one run per arm) -> serve (base + arms side by side) -> eval -> report.

`pipeline` only chains the stages; each stage reads and writes its own contract and can run
alone. A stage that finished writes `{run_dir}/stages/{name}.json` (its outputs, wall time
and a signature: a hash of the config sections and inputs it depends on); a rerun skips it
while the signature matches. A changed config makes that stage and every stage after it
stale: the pipeline refuses (exit 2, naming the stage) unless `force` is given, which deletes
the stale stages' outputs and runs them again. A stage killed midway has no marker, so it
runs again and resumes from its own state: generation skips done prompt ids (of the same
spec, teacher and judge), training resumes from its latest checkpoint. One pipeline at a
time per run directory (`runlock.RunLock`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deliberate_ray.config import ArmConfig, Config, ConfigError, PipelineConfig, override

log = logging.getLogger(__name__)
STAGE_SECTIONS = ("generate", "train", "serve", "eval")


def signature(*parts: Any) -> str:
    """A short hash of config sections (pydantic models) and upstream signatures."""
    blob = [p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts]
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StaleStage(ConfigError):
    """A finished stage's config or inputs changed since it ran."""


class Stages:
    """Completion markers of one run directory."""

    def __init__(self, run_dir: Path, force: bool = False):
        self.dir = run_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.force = force

    def done(self, name: str) -> dict[str, Any] | None:
        path = self.dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def run(
        self,
        name: str,
        fn: Callable[[], dict[str, Any]],
        sig: str = "",
        outputs: Callable[[dict[str, Any]], list[str]] | None = None,
    ) -> dict[str, Any]:
        """Run `fn` unless `name` already finished with this signature; record its outputs,
        wall time and signature. A finished stage with another signature is stale: refused
        unless `force`, which first deletes the folders `outputs(previous marker)` names."""
        if (prev := self.done(name)) is not None:
            if prev.get("signature") == sig:
                log.info("stage %s: done earlier, skipped (%s)", name, self.dir / f"{name}.json")
                return prev | {"skipped": True}
            if not self.force:
                raise StaleStage(
                    f"stage {name}",
                    [
                        f"finished earlier with another config or input (signature "
                        f"{prev.get('signature', '(none)')}, now {sig}); rerun with --force to "
                        "delete its outputs and run it and the stages after it again, or use "
                        "another run_dir"
                    ],
                )
            for folder in outputs(prev) if outputs else []:
                log.warning("stage %s: stale, deleting %s", name, folder)
                shutil.rmtree(folder, ignore_errors=True)
            (self.dir / f"{name}.json").unlink()
        log.info("stage %s: starting", name)
        t0 = time.perf_counter()
        result = fn() | {"wall_s": round(time.perf_counter() - t0, 2), "signature": sig}
        tmp = self.dir / f".{name}.json.tmp"
        tmp.write_text(json.dumps(result, indent=2, default=str))
        tmp.replace(self.dir / f"{name}.json")
        log.info("stage %s: finished in %.1f s", name, result["wall_s"])
        return result


def train_arm(
    cfg: Config, stages: Stages, arm: ArmConfig, tuples: str, upstream: str = ""
) -> dict[str, Any]:
    """SFT one arm on the tuples; an MSM arm first midtrains on spec documents. `upstream` is
    the generate stage's signature (the tuples' provenance)."""
    from deliberate_ray.train import run_train

    def run_dir_of(marker: dict[str, Any]) -> list[str]:
        return [marker["run_dir"]] if marker.get("run_dir") else []

    model = None
    sig = signature(cfg.train, arm, upstream)
    if arm.msm:
        assert cfg.train is not None
        steps = arm.msm_steps or cfg.train.max_steps
        msm_cfg = cfg.model_copy(update={"train": override(cfg.train, "train", max_steps=steps)})
        msm = stages.run(
            f"train-{arm.name}-msm",
            lambda: run_train(msm_cfg, variant="docs", name=f"{arm.name}-msm", data=arm.msm_docs),
            signature(msm_cfg.train, arm),
            run_dir_of,
        )
        model = msm["export_dir"]
        sig = signature(cfg.train, arm, upstream, msm["signature"])
    return stages.run(
        f"train-{arm.name}",
        lambda: run_train(cfg, variant=arm.variant, name=arm.name, data=[tuples], model=model),
        sig,
        run_dir_of,
    )


def train_arms(
    cfg: Config, stages: Stages, pipe: PipelineConfig, tuples: str, upstream: str = ""
) -> dict[str, dict[str, Any]]:
    """Every arm, one after another or (`parallel_arms`) at the same time in threads, each
    its own Ray Train run; results in the arms' order, the first failure raised."""
    if not pipe.parallel_arms or len(pipe.arms) < 2:
        return {arm.name: train_arm(cfg, stages, arm, tuples, upstream) for arm in pipe.arms}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(pipe.arms), thread_name_prefix="arm") as pool:
        futures = {
            a.name: pool.submit(train_arm, cfg, stages, a, tuples, upstream) for a in pipe.arms
        }
        return {name: f.result() for name, f in futures.items()}


def run_pipeline(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Every stage in order (see the module doc); one run per run_dir at a time."""
    from deliberate_ray.runlock import RunLock

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
    with RunLock(Path(cfg.run_dir), "pipeline"):
        return _run_pipeline(cfg, force)


def _run_pipeline(cfg: Config, force: bool) -> dict[str, Any]:
    from deliberate_ray.evals import run_eval
    from deliberate_ray.generate import run_generate
    from deliberate_ray.generate.run import resume_key
    from deliberate_ray.report import write_report
    from deliberate_ray.serve import shutdown, start_serve
    from deliberate_ray.serve.launch import run_key

    assert cfg.train is not None and cfg.serve is not None and cfg.eval is not None
    pipe = cfg.pipeline or PipelineConfig()
    warn_if_same_grader(cfg)
    run_dir = Path(cfg.run_dir)
    stages = Stages(run_dir, force)
    t0 = time.perf_counter()

    gen = stages.run(
        "generate",
        lambda: run_generate(cfg, fresh=force),
        # what a generated row depends on (resume_key: spec, teacher, judge) and which prompts
        # there are; engine throughput settings change no row and leave the stage valid
        signature(resume_key(cfg, spec_sha(cfg)), cfg.prompts, inputs_sha(cfg.prompts)),
        lambda marker: [marker["output_dir"]] if marker.get("output_dir") else [],
    )
    if not gen["stats"]["total"].get("kept"):
        raise RuntimeError(
            f"generation kept no tuples (see {gen['output_dir']}/stats.json); nothing to train on"
        )
    trained = train_arms(cfg, stages, pipe, gen["tuples"], gen["signature"])
    models = {"base": cfg.train.model} if pipe.compare_base else {}
    models |= {name: t["export_dir"] for name, t in trained.items()}

    def evaluate() -> dict[str, Any]:
        serve_cfg = override(cfg.serve, "serve", models=models)
        key_env = None if serve_cfg.no_auth else serve_cfg.api_key_env
        ev_cfg = override(cfg.eval, "eval", spec_variant=cfg.spec.variant, api_key_env=key_env)
        with run_key(serve_cfg):
            url = start_serve(models, serve_cfg)
            try:  # the app goes once the replies are in (the graders need no endpoint)
                return run_eval(
                    cfg.eval.suites, url, list(models), run_dir / "eval", ev_cfg, answered=shutdown
                )
            finally:
                shutdown()

    arm_sigs = [t["signature"] for t in trained.values()]
    ev = stages.run(
        "eval",
        evaluate,
        signature(cfg.serve, cfg.eval, pipe.compare_base, arm_sigs),
        lambda marker: [str(run_dir / "eval")],
    )
    summary = {
        "run_dir": str(run_dir),
        "generate": gen,
        "train": trained,
        "eval": ev,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    summary["report"] = str(write_report(cfg, summary))
    return summary


def spec_sha(cfg: Config) -> str:
    from deliberate_ray.spec import load_spec

    return load_spec(cfg.spec.path).sha


def inputs_sha(prompts: Any) -> str:
    """Content hash of local prompt files (a remote URI counts by its name)."""
    h = hashlib.sha256()
    for uri in prompts.sources:
        path = Path(uri)
        h.update(uri.encode())
        if "://" not in uri and path.is_file():
            h.update(path.read_bytes())
        elif "://" not in uri and path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file():
                    h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


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
