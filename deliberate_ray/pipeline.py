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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from deliberate_ray import storage
from deliberate_ray.config import (
    ArmConfig,
    Config,
    ConfigError,
    PipelineConfig,
    RLConfig,
    override,
    resolve_run,
)
from deliberate_ray.results import (
    DocsResult,
    EvalResult,
    GenerateResult,
    RLResult,
    StageResult,
    TrainResult,
)

log = logging.getLogger(__name__)
R = TypeVar("R", bound=StageResult)
STAGE_SECTIONS = ("generate", "train", "serve", "eval")


def signature(*parts: Any) -> str:
    """A short hash of config sections (pydantic models) and upstream signatures."""
    blob = [p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts]
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StaleStage(ConfigError):
    """A finished stage's config or inputs changed since it ran."""


class Stages:
    """Completion markers of one run directory."""

    def __init__(self, run_dir: str | Path, force: bool = False):
        self.dir = storage.join(storage.absolute(run_dir), "stages")
        storage.makedirs(self.dir)
        self.force = force

    def marker(self, name: str) -> str:
        return storage.join(self.dir, f"{name}.json")

    def done(self, name: str) -> dict[str, Any] | None:
        path = self.marker(name)
        return storage.read_json(path) if storage.exists(path) else None

    def all(self, pattern: str) -> dict[str, dict[str, Any]]:
        """Markers whose file names match `pattern` (e.g. `midtrain*.json`), by stage name."""
        return {
            storage.name(f).removesuffix(".json"): storage.read_json(f)
            for f in storage.glob(self.dir, pattern)
        }

    def run(
        self,
        name: str,
        fn: Callable[[], R],
        result_type: type[R],
        sig: str = "",
        outputs: Callable[[dict[str, Any]], list[str]] | None = None,
    ) -> R:
        """Run `fn` unless `name` already finished with this signature; store its typed result
        with the wall time and signature. A finished stage with another signature (or a record
        this version cannot read) is stale: refused unless `force`, which first deletes the
        folders `outputs(previous record)` names."""
        if (prev := self.done(name)) is not None:
            try:
                kept = result_type.model_validate(prev | {"skipped": True})
            except ValidationError:
                kept = None  # written by another version of the tool: rerun, like a change
            if kept is not None and prev.get("signature") == sig:
                log.info("stage %s: done earlier, skipped (%s)", name, self.marker(name))
                return kept
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
                storage.remove(folder)
            storage.remove(self.marker(name))
        log.info("stage %s: starting", name)
        t0 = time.perf_counter()
        result = fn().model_copy(
            update={"wall_s": round(time.perf_counter() - t0, 2), "signature": sig}
        )
        storage.write_json(self.marker(name), result.model_dump(mode="json"))  # it counts now
        log.info("stage %s: finished in %.1f s", name, result.wall_s)
        return result


def run_stage(cfg: Config, stage: str, **options: Any) -> Any:
    """One stage of a run config, as the CLI and the jobs run it: the run's cross-section
    defaults resolved once (`resolve_run`), then `run_<stage>(section, run_dir, *, <the
    run-level inputs it reads>, **options)`. Returns the stage's typed result."""
    if getattr(cfg, stage, None) is None:
        example = "configs/matrix.yaml" if stage in ("docs", "rl") else "configs/demo.yaml"
        raise ConfigError("config", [f"{stage}: missing section -> add one (see {example})"])
    cfg = resolve_run(cfg)
    section, shared = getattr(cfg, stage), {"spec": cfg.spec, "prompts": cfg.prompts}
    suites = {"eval_suites": cfg.eval.suites if cfg.eval else ()}
    if stage == "generate":
        from deliberate_ray.generate import run_generate

        return run_generate(section, cfg.run_dir, **shared, **suites, **options)
    if stage == "docs":
        from deliberate_ray.msm import run_docs

        return run_docs(section, cfg.run_dir, **shared, **suites, **options)
    if stage == "train":
        from deliberate_ray.train import run_train

        return run_train(section, cfg.run_dir, **options)
    if stage == "rl":
        from deliberate_ray.rl import run_rl

        return run_rl(section, cfg.run_dir, **shared, **suites, **options)
    if stage == "eval":
        from deliberate_ray.evals import run_eval

        return run_eval(section, cfg.run_dir, **options)
    raise ConfigError("stage", [f"unknown stage {stage!r}: generate, docs, train, rl or eval"])


def run_dir_of(marker: dict[str, Any]) -> list[str]:
    return [marker["run_dir"]] if marker.get("run_dir") else []


def midtrain(cfg: Config, stages: Stages, arm: ArmConfig, docs: DocsResult | None) -> TrainResult:
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
        data = [docs.documents[cfg.spec.variant]]
        upstream = docs.signature or ""
        if not storage.glob(data[0], "part-*.parquet"):
            total = docs.stats.get("total", {})
            rejected = ", ".join(f"{k} {v}" for k, v in sorted(total.get("rejected", {}).items()))
            raise ConfigError(
                "docs",
                [
                    f"the docs stage kept no {cfg.spec.variant!r} documents to midtrain on "
                    f"(planned {total.get('planned', 0)}, rejected: {rejected or 'none'}) -> "
                    f"read {docs.output_dir}/README.md and its quarantine, adjust `docs:` "
                    "(writer, max_tokens, min_words) and rerun"
                ],
            )
        if pipe.msm_chat_ratio > 0 and storage.glob(docs.chat, "part-*.parquet"):
            changes |= {"mix_data": docs.chat, "mix_ratio": pipe.msm_chat_ratio}
    key = midtrain_key(arm)
    name = "msm" if not key else f"msm-{key}"
    section = override(cfg.train, "train", variant="docs", name=name, data=data, **changes)
    return stages.run(
        "midtrain" if not key else f"midtrain-{key}",
        lambda: run_train(section, cfg.run_dir),
        TrainResult,
        signature(section, upstream),
        run_dir_of,
    )


def tuples_subset(tuples: str, fraction: float, out_dir: str) -> str:
    """A fixed share of the tuples (those whose id hashes lowest), as one Parquet file: the
    subsets of a sweep are nested (the 25% tuples are among the 50%)."""
    import pyarrow as pa

    table = pa.concat_tables(
        [storage.read_table(f) for f in storage.glob(tuples, "part-*.parquet")]
    )
    ids = table.column("id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())
    keep = sorted(order[: max(1, round(fraction * len(ids)))])
    path = storage.join(out_dir, f"tuples-{round(fraction * 100)}pct.parquet")
    storage.write_table(path, table.take(keep))
    return path


def train_arm(
    cfg: Config,
    stages: Stages,
    arm: ArmConfig,
    tuples: str,
    upstream: str = "",
    midtrained: TrainResult | None = None,
) -> TrainResult:
    """SFT one arm on the tuples (its share of them), from the midtrained model for an MSM
    arm. `upstream` is the generate stage's signature (the tuples' provenance)."""
    from deliberate_ray.train import run_train

    assert cfg.train is not None
    model, sigs = None, [cfg.train, arm, upstream]
    if midtrained is not None:
        model = midtrained.export_dir
        sigs.append(midtrained.signature)
    data = tuples
    if arm.tuples_fraction < 1.0:
        subsets = storage.join(cfg.run_dir, "train", "subsets")
        data = tuples_subset(tuples, arm.tuples_fraction, subsets)
    section = override(
        cfg.train, "train", variant=arm.variant, name=arm.name, data=[data], model=model
    )
    return stages.run(
        f"train-{arm.name}",
        lambda: run_train(section, cfg.run_dir),
        TrainResult,
        signature(*sigs),
        run_dir_of,
    )


def train_arms(
    cfg: Config,
    stages: Stages,
    pipe: PipelineConfig,
    tuples: str,
    upstream: str = "",
    docs: DocsResult | None = None,
) -> dict[str, TrainResult]:
    """Midtrain once per distinct MSM setting and train every arm (sweep copies included),
    one after another or (`parallel_arms`) at the same time in threads, each its own Ray
    Train run; results in the arms' order, the first failure raised."""
    arms = pipe.expanded_arms()
    if not pipe.parallel_arms or len(arms) < 2:
        mids: dict[str, TrainResult] = {}
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
    cfg: Config, stages: Stages, pipe: PipelineConfig, trained: dict[str, TrainResult]
) -> dict[str, RLResult]:
    """The RL stage (docs/rl.md) of every arm with `rl: true` (sweep copies aside): GRPO from
    the arm's SFT export, as stage `rl-<arm>`; keyed `<arm>-rl`, the name it is served and
    evaluated under."""
    from deliberate_ray.rl import run_rl

    out: dict[str, RLResult] = {}
    for arm in pipe.arms:
        if not arm.rl:
            continue
        sft = trained[arm.name]
        section = override(cfg.rl or RLConfig(), "rl", arm=arm.name, init_model=sft.export_dir)
        out[f"{arm.name}-rl"] = stages.run(
            f"rl-{arm.name}",
            lambda section=section: run_rl(
                section,
                cfg.run_dir,
                spec=cfg.spec,
                prompts=cfg.prompts,
                eval_suites=cfg.eval.suites if cfg.eval else (),
            ),
            RLResult,
            signature(cfg.rl, cfg.spec, cfg.prompts, sft.signature),
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
    cfg = resolve_run(cfg)  # the run's cross-section defaults, once
    with RunLock(cfg.run_dir, "pipeline"):
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
    run_dir = cfg.run_dir
    stages = Stages(run_dir, force)
    t0 = time.perf_counter()

    # what every stage that reads them gets: the run's spec, prompt pool and eval suites
    shared: dict[str, Any] = {
        "spec": cfg.spec,
        "prompts": cfg.prompts,
        "eval_suites": cfg.eval.suites,
        "progress": True,
    }
    docs = None
    if cfg.docs is not None:
        from deliberate_ray.msm import run_docs
        from deliberate_ray.msm.docs import resume_key as docs_key

        spec = load_spec(cfg.spec.path)
        docs = stages.run(
            "docs",
            lambda: run_docs(cfg.docs, run_dir, fresh=force, **shared),
            DocsResult,
            signature(docs_key(cfg, spec), inputs_sha(cfg.prompts)),
            lambda marker: [marker["output_dir"]] if marker.get("output_dir") else [],
        )
    assert cfg.generate is not None
    gen = stages.run(
        "generate",
        lambda: run_generate(cfg.generate, run_dir, fresh=force, **shared),
        GenerateResult,
        # what a generated row depends on (resume_key: spec, teacher, judge) and which prompts
        # there are; engine throughput settings change no row and leave the stage valid
        signature(resume_key(cfg, spec_sha(cfg)), cfg.prompts, inputs_sha(cfg.prompts)),
        lambda marker: [marker["output_dir"]] if marker.get("output_dir") else [],
    )
    if not gen.stats["total"].get("kept"):
        raise RuntimeError(
            f"generation kept no tuples (see {gen.output_dir}/stats.json); nothing to train on"
        )
    trained = train_arms(cfg, stages, pipe, gen.tuples, gen.signature or "", docs)
    rl_runs = rl_arms(cfg, stages, pipe, trained)
    models: dict[str, str] = {"base": cfg.train.model} if pipe.compare_base else {}
    for name, result in [*trained.items(), *rl_runs.items()]:
        if result.export_dir is None:
            raise RuntimeError(f"{name}: training wrote no export to serve ({result.run_dir})")
        models[name] = result.export_dir

    def evaluate() -> EvalResult:
        serve_cfg = override(cfg.serve, "serve", models=models)
        key_env = None if serve_cfg.no_auth else serve_cfg.api_key_env
        ev_cfg = override(cfg.eval, "eval", api_key_env=key_env)
        names = list(models)
        size = pipe.serve_models_at_once or len(names)
        groups = [names[i : i + size] for i in range(0, len(names), size)]

        def serve_group(group: list[str]) -> str:
            shutdown()  # the previous group's engines go first
            return start_serve({m: models[m] for m in group}, serve_cfg)

        with run_key(serve_cfg):
            try:  # the app goes once the replies are in (the graders need no endpoint)
                return run_eval(
                    ev_cfg,
                    run_dir,
                    models=names,
                    answered=shutdown,
                    groups=groups,
                    serve_group=serve_group,
                )
            finally:
                shutdown()

    arm_sigs = [r.signature for r in [*trained.values(), *rl_runs.values()]]
    ev = stages.run(
        "eval",
        evaluate,
        EvalResult,
        signature(cfg.serve, cfg.eval, pipe.compare_base, arm_sigs),
        lambda marker: [marker["out_dir"]] if marker.get("out_dir") else [],
    )
    # The report reads plain records, as they are stored in stages/.
    summary = {
        "run_dir": run_dir,
        "docs": docs.model_dump() if docs else None,
        "midtrain": stages.all("midtrain*.json"),
        "generate": gen.model_dump(),
        "train": {name: t.model_dump() for name, t in trained.items()},
        "rl": {name: r.model_dump() for name, r in rl_runs.items()},
        "eval": ev.model_dump(),
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
