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


def run_dir_of(marker: dict[str, Any]) -> list[str]:
    return [marker["run_dir"]] if marker.get("run_dir") else []


def midtrain(
    cfg: Config, stages: Stages, arm: ArmConfig, docs: dict[str, Any] | None
) -> dict[str, Any]:
    """Model Spec Midtraining for an MSM arm: the student trained on the spec documents
    (the docs stage's corpus of the spec variant, or the arm's `msm_docs`), mixed with the
    docs stage's chat rows at `pipeline.msm_chat_ratio`. Arms with the same documents and
    steps share one midtrained model (one stage: `midtrain`, or `midtrain-<arm>`)."""
    from deliberate_ray.train import run_train

    assert cfg.train is not None
    pipe = cfg.pipeline or PipelineConfig()
    steps = arm.msm_steps or pipe.msm_max_steps or cfg.train.max_steps
    changes: dict[str, Any] = {"max_steps": steps}
    upstream = ""
    if arm.msm_docs:
        data = list(arm.msm_docs)
    else:
        if docs is None:
            raise ConfigError(
                f"pipeline.arms[{arm.name}]",
                ["msm: true without msm_docs needs a `docs:` section (the corpus to midtrain on)"],
            )
        data = [docs["documents"][cfg.spec.variant]]
        upstream = docs["signature"]
        if not any(Path(data[0]).glob("part-*.parquet")):
            total = docs.get("stats", {}).get("total", {})
            rejected = ", ".join(f"{k} {v}" for k, v in sorted(total.get("rejected", {}).items()))
            raise ConfigError(
                "docs",
                [
                    f"the docs stage kept no {cfg.spec.variant!r} documents to midtrain on "
                    f"(planned {total.get('planned', 0)}, rejected: {rejected or 'none'}) -> "
                    f"read {docs['output_dir']}/README.md and its quarantine, adjust `docs:` "
                    "(writer, max_tokens, min_words) and rerun"
                ],
            )
        if pipe.msm_chat_ratio > 0 and any(Path(docs["chat"]).glob("part-*.parquet")):
            changes |= {"mix_data": docs["chat"], "mix_ratio": pipe.msm_chat_ratio}
    msm_cfg = cfg.model_copy(update={"train": override(cfg.train, "train", **changes)})
    key = midtrain_key(arm)
    name = "msm" if not key else f"msm-{key}"
    return stages.run(
        "midtrain" if not key else f"midtrain-{key}",
        lambda: run_train(msm_cfg, variant="docs", name=name, data=data),
        signature(msm_cfg.train, data, upstream),
        run_dir_of,
    )


def tuples_subset(tuples: str, fraction: float, out_dir: Path) -> str:
    """A fixed share of the tuples (those whose id hashes lowest), as one Parquet file: the
    subsets of a sweep are nested (the 25% tuples are among the 50%)."""
    import pyarrow.parquet as pq

    table = pq.read_table(tuples)
    ids = table.column("id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())
    keep = sorted(order[: max(1, round(fraction * len(ids)))])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"tuples-{round(fraction * 100)}pct.parquet"
    pq.write_table(table.take(keep), path)
    return str(path)


def train_arm(
    cfg: Config,
    stages: Stages,
    arm: ArmConfig,
    tuples: str,
    upstream: str = "",
    midtrained: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SFT one arm on the tuples (its share of them), from the midtrained model for an MSM
    arm. `upstream` is the generate stage's signature (the tuples' provenance)."""
    from deliberate_ray.train import run_train

    model, sigs = None, [cfg.train, arm, upstream]
    if midtrained is not None:
        model = midtrained["export_dir"]
        sigs.append(midtrained["signature"])
    data = tuples
    if arm.tuples_fraction < 1.0:
        data = tuples_subset(tuples, arm.tuples_fraction, Path(cfg.run_dir) / "train" / "subsets")
    return stages.run(
        f"train-{arm.name}",
        lambda: run_train(cfg, variant=arm.variant, name=arm.name, data=[data], model=model),
        signature(*sigs),
        run_dir_of,
    )


def train_arms(
    cfg: Config,
    stages: Stages,
    pipe: PipelineConfig,
    tuples: str,
    upstream: str = "",
    docs: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Midtrain once per distinct MSM setting and train every arm (sweep copies included),
    one after another or (`parallel_arms`) at the same time in threads, each its own Ray
    Train run; results in the arms' order, the first failure raised."""
    arms = pipe.expanded_arms()
    if not pipe.parallel_arms or len(arms) < 2:
        mids: dict[str, dict[str, Any]] = {}
        for arm in arms:
            if arm.msm and midtrain_key(arm) not in mids:
                mids[midtrain_key(arm)] = midtrain(cfg, stages, arm, docs)
        return {
            a.name: train_arm(
                cfg, stages, a, tuples, upstream, mids.get(midtrain_key(a)) if a.msm else None
            )
            for a in arms
        }
    from concurrent.futures import Future, ThreadPoolExecutor

    import ray

    if not ray.is_initialized():  # once, here: threads racing to start Ray would fail
        ray.init()
    # transformers resolves its lazy attributes on first use, and threads racing through
    # that fail ("cannot import name 'AutoTokenizer'"): resolve them here, once.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    # The midtraining needs only the docs: it runs beside the arms that start from the base
    # model (one Ray Train worker leaves the other cores to them), and each MSM arm starts
    # when its midtrained model is there. Plain arms are queued first, so that a waiting MSM
    # arm never holds a slot a plain arm could use.
    keys = list(dict.fromkeys(midtrain_key(a) for a in arms if a.msm))
    workers = min(len(arms), pipe.max_parallel_arms or len(arms))
    with (
        ThreadPoolExecutor(max(1, len(keys)), thread_name_prefix="midtrain") as mid_pool,
        ThreadPoolExecutor(workers, thread_name_prefix="arm") as pool,
    ):
        first = {midtrain_key(a): a for a in reversed(arms) if a.msm}
        mids_f: dict[str, Future] = {
            k: mid_pool.submit(midtrain, cfg, stages, first[k], docs) for k in keys
        }

        def run_arm(a: ArmConfig) -> dict[str, Any]:
            mid = mids_f[midtrain_key(a)].result() if a.msm else None
            return train_arm(cfg, stages, a, tuples, upstream, mid)

        futures = {a.name: pool.submit(run_arm, a) for a in sorted(arms, key=lambda a: a.msm)}
        for f in mids_f.values():  # a failed midtraining is the error to show
            f.result()
        return {a.name: futures[a.name].result() for a in arms}


def midtrain_key(arm: ArmConfig) -> str:
    """ "" for the shared midtraining (the docs stage's corpus, the pipeline's steps); else a
    short hash of the arm's own documents and steps (sweep copies share their arm's)."""
    if not arm.msm_docs and arm.msm_steps is None:
        return ""
    return signature(arm.msm_docs, arm.msm_steps)[:8]


def rl_arms(
    cfg: Config, stages: Stages, pipe: PipelineConfig, trained: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The RL stage (docs/rl.md) of every arm with `rl: true` (sweep copies aside): GRPO from
    the arm's SFT export, as stage `rl-<arm>`; keyed `<arm>-rl`, the name it is served and
    evaluated under."""
    from deliberate_ray.rl import run_rl

    out: dict[str, dict[str, Any]] = {}
    for arm in pipe.arms:
        if not arm.rl:
            continue
        sft = trained[arm.name]
        out[f"{arm.name}-rl"] = stages.run(
            f"rl-{arm.name}",
            lambda arm=arm, sft=sft: run_rl(cfg, arm=arm.name, init_model=sft["export_dir"]),
            signature(cfg.rl, cfg.spec, cfg.prompts, sft["signature"]),
            run_dir_of,
        )
    return out


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
    from deliberate_ray.spec import load_spec

    assert cfg.train is not None and cfg.serve is not None and cfg.eval is not None
    pipe = cfg.pipeline or PipelineConfig()
    warn_if_same_grader(cfg)
    run_dir = Path(cfg.run_dir)
    stages = Stages(run_dir, force)
    t0 = time.perf_counter()

    docs = None
    if cfg.docs is not None:
        from deliberate_ray.msm import run_docs
        from deliberate_ray.msm.docs import resume_key as docs_key

        spec = load_spec(cfg.spec.path)
        docs = stages.run(
            "docs",
            lambda: run_docs(cfg, fresh=force),
            signature(docs_key(cfg, spec), inputs_sha(cfg.prompts)),
            lambda marker: [marker["output_dir"]] if marker.get("output_dir") else [],
        )
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
    trained = train_arms(cfg, stages, pipe, gen["tuples"], gen["signature"], docs)
    rl_runs = rl_arms(cfg, stages, pipe, trained)
    models = {"base": cfg.train.model} if pipe.compare_base else {}
    models |= {name: t["export_dir"] for name, t in trained.items()}
    models |= {name: r["export_dir"] for name, r in rl_runs.items()}

    def evaluate() -> dict[str, Any]:
        serve_cfg = override(cfg.serve, "serve", models=models)
        key_env = None if serve_cfg.no_auth else serve_cfg.api_key_env
        ev_cfg = override(cfg.eval, "eval", spec_variant=cfg.spec.variant, api_key_env=key_env)
        names = list(models)
        size = pipe.serve_models_at_once or len(names)
        groups = [names[i : i + size] for i in range(0, len(names), size)]

        def serve_group(group: list[str]) -> str:
            shutdown()  # the previous group's engines go first
            return start_serve({m: models[m] for m in group}, serve_cfg)

        with run_key(serve_cfg):
            try:  # the app goes once the replies are in (the graders need no endpoint)
                return run_eval(
                    cfg.eval.suites,
                    "",
                    names,
                    run_dir / "eval",
                    ev_cfg,
                    answered=shutdown,
                    groups=groups,
                    serve_group=serve_group,
                )
            finally:
                shutdown()

    arm_sigs = [t["signature"] for t in trained.values()]
    arm_sigs += [r["signature"] for r in rl_runs.values()]
    ev = stages.run(
        "eval",
        evaluate,
        signature(cfg.serve, cfg.eval, pipe.compare_base, arm_sigs),
        lambda marker: [str(run_dir / "eval")],
    )
    midtrained = {f.stem: json.loads(f.read_text()) for f in stages.dir.glob("midtrain*.json")}
    summary = {
        "run_dir": str(run_dir),
        "docs": docs,
        "midtrain": midtrained,
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
