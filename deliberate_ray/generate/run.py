"""The generate stage on Ray Data (docs/generate.md: the method up to the tuples).

prompts -> n teacher requests each (spec in context) -> teacher engine -> parse + checks
-> k judge requests per gated sample -> judge engine -> read scores: one lazy Dataset.
The driver streams its rows, groups them per prompt, selects the best sample, strips the
spec, and commits finished prompts shard by shard (see `store`), so a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from deliberate_ray import storage
from deliberate_ray.config import (
    Config,
    GenerateConfig,
    LLMJudgeConfig,
    PromptsConfig,
    SpecConfig,
)
from deliberate_ray.contracts import (
    CHECKS,
    MESSAGES,
    PROMPT,
    QUARANTINE,
    quarantine_row,
    stable_id,
)
from deliberate_ray.engines import apply_engine, resolve_engine
from deliberate_ray.engines.rows import LIGHT_CPUS, SAMPLING_PARAMS, sampling_params
from deliberate_ray.generate import teacher
from deliberate_ray.generate.store import ShardStore, write_card
from deliberate_ray.graders.refusal import grade_refusals
from deliberate_ray.graders.rules import run_checks
from deliberate_ray.judge import (
    SCORE_PREFILL,
    checks_score,
    expected_score,
    failed_gate,
    judge_messages,
    parse_judgement,
    select_best,
)
from deliberate_ray.prompts import load_prompts
from deliberate_ray.results import GenerateResult
from deliberate_ray.spec import Spec, load_spec

log = logging.getLogger(__name__)

PROMPT_COLS = [
    pa.field("id", pa.string()),
    pa.field("prompt_messages", MESSAGES),
    pa.field("category", pa.string()),
    pa.field("ideal_action", pa.string()),
    pa.field("source", pa.string()),
    pa.field("sample_index", pa.int32()),
]
REQUEST = pa.schema(
    [*PROMPT_COLS, pa.field("messages", MESSAGES), pa.field("sampling_params", SAMPLING_PARAMS)]
)
DRAFT_COLS = [
    *PROMPT_COLS,
    pa.field("raw_text", pa.string()),
    pa.field("cot", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("teacher_input_tokens", pa.int32()),
    pa.field("teacher_generated_tokens", pa.int32()),
    pa.field("teacher_finish_reason", pa.string()),
    pa.field("malformed", pa.string()),
    # The teacher's error (the judge engine adds its own `engine_error` column after this).
    pa.field("teacher_error", pa.string()),
    pa.field("checks", CHECKS),
    pa.field("gate", pa.string()),
    pa.field("judge_index", pa.int32()),
    pa.field("judge_runs", pa.int32()),
]
JUDGE_REQUEST = pa.schema(
    [*DRAFT_COLS, pa.field("messages", MESSAGES), pa.field("sampling_params", SAMPLING_PARAMS)]
)
JUDGED_ROW = pa.schema(
    [
        *DRAFT_COLS,
        pa.field("judge_score", pa.float64()),
        pa.field("judge_rationale", pa.string()),
        pa.field("judge_input_tokens", pa.int32()),
        pa.field("judge_generated_tokens", pa.int32()),
    ]
)
COUNTS = (
    "prompts",
    "samples",
    "judged",
    "kept",
    "teacher_input_tokens",
    "teacher_generated_tokens",
    "judge_input_tokens",
    "judge_generated_tokens",
)
NOT_JUDGED = {
    "judge_score": None,
    "judge_rationale": None,
    "judge_input_tokens": 0,
    "judge_generated_tokens": 0,
}


def row_seed(base: int | None, *parts: Any) -> int | None:
    """A per-row seed from the config seed: reruns sample the same text, batching aside."""
    if base is None:
        return None
    return int(stable_id(base, *parts, prefix="s")[2:], 16) % (2**31)


# ------------------------------------------------------------------ dataset stages


def teacher_requests(batch: pa.Table, spec: Spec, cfg: Config) -> pa.Table:
    """Each prompt -> n teacher requests (spec_for(category) + examples + prompt)."""
    t = cfg.generate.teacher  # type: ignore[union-attr]
    stops = teacher.stop_strings(t)
    rows = []
    for p in batch.to_pylist():
        messages = teacher.teacher_messages(p["messages"], spec, p["category"], cfg.spec.variant, t)
        regex = teacher.reply_regex(spec, p["category"], t) if t.constrain else None
        for i in range(t.samples_per_prompt):
            rows.append(
                {k: p[k] for k in ("id", "category", "ideal_action", "source")}
                | {
                    "prompt_messages": p["messages"],
                    "sample_index": i,
                    "messages": messages,
                    "sampling_params": sampling_params(
                        t.sampling, stops, row_seed(t.sampling.seed, p["id"], i), regex=regex
                    ),
                }
            )
    return pa.Table.from_pylist(rows, schema=REQUEST)


def drafts(batch: pa.Table, spec: Spec, cfg: Config) -> pa.Table:
    """Parse each sample into CoT + answer (or a quarantine reason), run the programmatic
    checks, and fan gated samples out into k judge requests (others: one skip row)."""
    g: GenerateConfig = cfg.generate  # type: ignore[assignment]
    rows = batch.to_pylist()
    parsed = [
        teacher.parse(r["generated_text"], r["finish_reason"], r["engine_error"], g.teacher)
        for r in rows
    ]
    ok = [i for i, p in enumerate(parsed) if p.malformed is None]
    pairs = [(teacher_prompt_text(rows[i]), parsed[i].answer or "") for i in ok]
    actions = grade_refusals(pairs, g.judge.action_grader) if pairs else []
    action_of = dict(zip(ok, actions, strict=True))
    llm = g.judge.llm
    out = []
    for i, (r, p) in enumerate(zip(rows, parsed, strict=True)):
        draft = {f.name: r.get(f.name) for f in PROMPT_COLS} | {
            "raw_text": p.raw_text,
            "cot": p.cot,
            "answer": p.answer,
            "teacher_input_tokens": r["num_input_tokens"],
            "teacher_generated_tokens": r["num_generated_tokens"],
            "teacher_finish_reason": r["finish_reason"],
            "malformed": p.malformed,
            "teacher_error": r["engine_error"],
            "checks": None,
            "gate": None,
            "judge_index": 0,
            "judge_runs": 1,
        }
        if i in action_of:
            checks = run_checks(
                spec,
                r["category"],
                r["ideal_action"],
                p.cot or "",
                p.answer or "",
                action_of[i],
                g.judge,
            )
            draft["checks"] = checks
            draft["gate"] = failed_gate(checks) if g.judge.programmatic else None
        if not llm.enabled:
            out.append(draft)
            continue
        if p.malformed or draft["gate"]:
            out.append(
                draft
                | {
                    "messages": skip_messages(llm.prefill),
                    # The same optional fields as the stage's judged rows: the vLLM engine
                    # drops a field no row of a batch uses, and Ray cannot concatenate
                    # blocks whose sampling_params differ in their fields.
                    "sampling_params": judge_params(llm, row_seed(llm.sampling.seed, r["id"]))
                    | {"max_tokens": 0},
                }
            )
            continue
        for j in range(llm.k):
            seed = row_seed(llm.sampling.seed, r["id"], r["sample_index"], j)
            out.append(
                draft
                | {
                    "judge_index": j,
                    "judge_runs": llm.k,
                    "messages": judge_messages(spec, cfg.spec.variant, draft, llm, run=j),
                    "sampling_params": judge_params(llm, seed),
                }
            )
    if llm.enabled:
        return pa.Table.from_pylist(out, schema=JUDGE_REQUEST)
    return pa.Table.from_pylist([d | NOT_JUDGED for d in out], schema=JUDGED_ROW)


# `logprobs` scoring: the top 20 tokens at the first few positions after "Score:" (the
# space, then the digit); greedy, so the path to the digit is the judge's most likely one.
SCORE_LOGPROBS = 20
SCORE_TOKENS = 3


def judge_params(llm: LLMJudgeConfig, seed: int | None) -> dict[str, Any]:
    if llm.scoring == "logprobs":
        greedy = llm.sampling.model_copy(update={"max_tokens": SCORE_TOKENS, "temperature": 0.0})
        return sampling_params(greedy, logprobs=SCORE_LOGPROBS)
    return sampling_params(llm.sampling, seed=seed)


def teacher_prompt_text(row: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in row["prompt_messages"] if m["role"] == "user")


def skip_messages(prefill: bool) -> list[dict[str, str]]:
    """A minimal request of the same shape as real judge requests, for rows not judged."""
    messages = [{"role": "user", "content": "-"}]
    if prefill:
        messages.append({"role": "assistant", "content": SCORE_PREFILL})
    return messages


def judgements(batch: pa.Table, prefill: bool, scoring: str = "sampled") -> pa.Table:
    """Judge outputs -> score and justification (or how the score was read) per judge run."""
    rows = []
    for r in batch.to_pylist():
        row = {f.name: r[f.name] for f in DRAFT_COLS}
        if r["finish_reason"] == "skipped":
            rows.append(row | NOT_JUDGED)
            continue
        if r["engine_error"]:
            score, rationale = None, f"judge engine error: {r['engine_error']}"
        elif scoring == "logprobs":
            score, rationale = expected_score(r["top_logprobs"])
        else:
            score, rationale = parse_judgement(r["generated_text"], prefill)
        rows.append(
            row
            | {
                "judge_score": score,
                "judge_rationale": rationale,
                "judge_input_tokens": r["num_input_tokens"],
                "judge_generated_tokens": r["num_generated_tokens"],
            }
        )
    return pa.Table.from_pylist(rows, schema=JUDGED_ROW)


def light_stage(ds: Any, fn: Any, **kwargs: Any) -> Any:
    """A cheap whole-block stage (Arrow in, Arrow out) on a fraction of a CPU."""
    return ds.map_batches(
        fn, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None, num_cpus=LIGHT_CPUS
    )


def build_dataset(prompts: pa.Table, spec: Spec, cfg: Config) -> Any:
    """The lazy Dataset of judged rows (one per judge run) for `prompts`."""
    import ray.data

    g: GenerateConfig = cfg.generate  # type: ignore[assignment]
    chunk = max(1, g.shard_prompts)
    blocks = [prompts.slice(i, chunk) for i in range(0, prompts.num_rows, chunk)]
    ds = light_stage(ray.data.from_arrow(blocks), teacher_requests, spec=spec, cfg=cfg)
    ds = apply_engine(ds, g.teacher.engine, [f.name for f in PROMPT_COLS])
    ds = light_stage(ds, drafts, spec=spec, cfg=cfg)
    if g.judge.llm.enabled:
        ds = apply_engine(ds, g.judge.llm.engine, [f.name for f in DRAFT_COLS])
        llm = g.judge.llm
        ds = light_stage(ds, judgements, prefill=llm.prefill, scoring=llm.scoring)
    return ds


# ------------------------------------------------------------------ driver: group, select, write


class Collector:
    """Groups streamed rows by prompt; yields a prompt once all n samples, each with all its
    judge runs, have arrived."""

    def __init__(self, samples_per_prompt: int):
        self.n = samples_per_prompt
        self.rows: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(
            lambda: defaultdict(list)
        )

    def add(self, batch: pa.Table) -> list[dict[int, list[dict[str, Any]]]]:
        complete = []
        for r in batch.to_pylist():
            samples = self.rows[r["id"]]
            samples[r["sample_index"]].append(r)
            done = len(samples) == self.n and all(
                len(runs) == runs[0]["judge_runs"] for runs in samples.values()
            )
            if done:
                complete.append(self.rows.pop(r["id"]))
        return complete

    @property
    def pending(self) -> int:
        return len(self.rows)


class Finisher:
    """Turns one prompt's judged rows into tuple / sample / quarantine rows and stats."""

    def __init__(self, spec: Spec, cfg: Config):
        self.g: GenerateConfig = cfg.generate  # type: ignore[assignment]
        self.spec_sha = spec.sha
        self.teacher = self.g.teacher.engine.label
        self.judge = self.judge_label(self.g)

    @staticmethod
    def judge_label(g: GenerateConfig) -> str:
        parts = [f"checks({g.judge.action_grader})"] if g.judge.programmatic else []
        if g.judge.llm.enabled:
            parts.append(f"llm:{g.judge.llm.engine.label}:k={g.judge.llm.k}")
        return "+".join(parts)

    def finish(
        self, samples: dict[int, list[dict[str, Any]]], out: dict[str, list], stats: Counter
    ) -> None:
        first = samples[0][0]
        pid, category = first["id"], first["category"]
        stats["prompts"] += 1
        stats[f"prompts_by_category:{category}"] += 1
        judged = []
        for index in sorted(samples):
            runs = sorted(samples[index], key=lambda r: r["judge_index"])
            r = runs[0]
            stats["samples"] += 1
            stats["teacher_input_tokens"] += r["teacher_input_tokens"]
            stats["teacher_generated_tokens"] += r["teacher_generated_tokens"]
            stats["judge_input_tokens"] += sum(x["judge_input_tokens"] for x in runs)
            stats["judge_generated_tokens"] += sum(x["judge_generated_tokens"] for x in runs)
            if r["malformed"]:
                stats[f"quarantine:parse:{r['malformed']}"] += 1
                out["quarantine"].append(self.malformed_row(r))
                continue
            judged.append(self.judged_row(runs))
        best = select_best(judged, self.g.judge.threshold)
        for s in judged:
            stats["judged"] += 1
            if s["reject_reason"]:
                stats[f"rejected:{s['reject_reason']}"] += 1
        out["samples"] += judged
        if best is None:
            stats["quarantine:select:no_sample_passed"] += 1
            reasons = Counter(s["reject_reason"] for s in judged)
            reasons.update(
                f"parse:{r[0]['malformed']}" for r in samples.values() if r[0]["malformed"]
            )
            raw = {"messages": first["prompt_messages"], "category": category, "reasons": reasons}
            out["quarantine"].append(quarantine_row("select", "no_sample_passed", raw, pid))
            return
        stats["kept"] += 1
        stats[f"kept_by_category:{category}"] += 1
        out["tuples"].append(
            {
                "id": pid,
                "messages": best["messages"],  # the prompt alone: spec and examples stripped
                "cot": best["cot"],
                "answer": best["answer"],
                "category": category,
                "ideal_action": best["ideal_action"],
                "score": best["score"],
                "spec_sha": self.spec_sha,
                "teacher": self.teacher,
                "judge": self.judge,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )

    def sample_row(self, r: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": r["id"],
            "messages": r["prompt_messages"],
            "category": r["category"],
            "ideal_action": r["ideal_action"],
            "source": r["source"],
            "sample_index": r["sample_index"],
            "cot": r["cot"],
            "answer": r["answer"],
            "raw_text": r["raw_text"],
            "num_input_tokens": r["teacher_input_tokens"],
            "num_generated_tokens": r["teacher_generated_tokens"],
            "finish_reason": r["teacher_finish_reason"],
            "teacher": self.teacher,
            "spec_sha": self.spec_sha,
        }

    def malformed_row(self, r: dict[str, Any]) -> dict[str, Any]:
        raw = self.sample_row(r) | {"engine_error": r["teacher_error"]}
        return quarantine_row("parse", r["malformed"], raw, f"{r['id']}:{r['sample_index']}")

    def judged_row(self, runs: list[dict[str, Any]]) -> dict[str, Any]:
        r = runs[0]
        llm = self.g.judge.llm
        reject = r["gate"]
        judged = r["judge_score"] is not None or r["judge_rationale"] is not None
        scores = [x["judge_score"] for x in runs if x["judge_score"] is not None]
        if not llm.enabled:
            score: float | None = checks_score(r["checks"])
        elif reject:
            score = None
        else:
            score = min(scores) if scores else None
            if len(scores) < llm.k:
                reject = "judge_unparseable"
        return self.sample_row(r) | {
            "judge_scores": scores,
            "judge_rationales": [x["judge_rationale"] for x in runs] if judged else [],
            "score": score,
            "checks": r["checks"],
            "keep": False,
            "reject_reason": reject,
        }


def split_stats(flat: Counter) -> dict[str, Any]:
    """`quarantine:stage:reason` style keys -> nested dicts for stats.json."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        group, sep, name = key.partition(":")
        if sep:
            nested.setdefault(group, {})[name] = value
        else:
            nested[key] = value
    return nested


def output_dir(cfg: Config) -> str:
    """The stage's folder: a local path (absolute) or a URI such as s3://bucket/run/generate."""
    g = cfg.generate or GenerateConfig()
    return storage.absolute(g.output_dir or storage.join(cfg.run_dir, "generate"))


def guard_eval_only(
    prompts: pa.Table, cfg: Config, eval_suites: Sequence[str] | None = None
) -> None:
    """Refuse (ConfigError) training prompts that are rows of an evaluation-only suite: the
    prompts section's `eval_only_suites`, the run's eval suites (`eval_suites`, else those of
    `cfg.eval`) and every built public suite."""
    from deliberate_ray.evals.public import check_eval_only, default_guard_suites

    if eval_suites is None:
        eval_suites = cfg.eval.suites if cfg.eval else []
    suites = [*cfg.prompts.eval_only_suites, *eval_suites]
    pairs = [
        (pid, msgs[-1]["content"])
        for pid, msgs in zip(
            prompts["id"].to_pylist(), prompts["messages"].to_pylist(), strict=True
        )
    ]
    check_eval_only(pairs, default_guard_suites(suites))


def resume_key(cfg: Config, spec_sha: str) -> str:
    """What a generated row depends on besides its prompt: the spec (its sha and variant),
    the teacher (model, sampling, format, examples) and the judge. Engine throughput
    settings (batch size, concurrency, ...) are left out: they change no row."""
    g: GenerateConfig = cfg.generate  # type: ignore[assignment]
    teacher = g.teacher.model_dump(mode="json", exclude={"engine"})
    judge = g.judge.model_dump(mode="json", exclude={"llm": {"engine"}})
    blob = {
        "spec_sha": spec_sha,
        "variant": cfg.spec.variant,
        "teacher": teacher | {"model": g.teacher.engine.label},
        "judge": judge | {"llm_model": g.judge.llm.engine.label if g.judge.llm.enabled else None},
    }
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_generate(
    section: GenerateConfig,
    run_dir: str,
    *,
    spec: SpecConfig,
    prompts: PromptsConfig,
    eval_suites: Sequence[str] = (),
    progress: bool = True,
    fresh: bool = False,
) -> GenerateResult:
    """Run (or resume) the generate stage into `section.output_dir` (null: {run_dir}/generate)
    on the run's spec and prompt pool; `eval_suites` are refused as training prompts.
    Resuming needs the same spec, teacher and judge (`resume_key`); `fresh` deletes earlier
    output first."""
    from deliberate_ray.runlock import RunLock

    cfg = Config(run_dir=run_dir, spec=spec, prompts=prompts, generate=resolve_engines(section))
    loaded = load_spec(spec.path)
    root = output_dir(cfg)
    prompt_set = load_prompts(prompts, loaded.category_ids)
    table = _table(prompt_set.prompts, PROMPT)
    guard_eval_only(table, cfg, eval_suites)  # before anything is written
    with RunLock(root, "generate"):
        store = ShardStore(root, resume_key(cfg, loaded.sha), fresh=fresh)
        return _generate(cfg, loaded, root, store, prompt_set, table, progress)


def _generate(
    cfg: Config,
    spec: Spec,
    root: str,
    store: ShardStore,
    prompt_set: Any,
    prompts: pa.Table,
    progress: bool,
) -> GenerateResult:
    g: GenerateConfig = cfg.generate  # type: ignore[assignment]
    started = time.time()
    warn_if_actors_cannot_fit(g)
    bad = _table(prompt_set.quarantine, QUARANTINE)
    store.write_prompt_quarantine(bad)
    done = store.done_ids
    todo = prompts.filter(pc.invert(pc.is_in(prompts["id"], pa.array(sorted(done), pa.string()))))
    log.info(
        "generate: %d prompts, %d already done, %d to do",
        prompts.num_rows,
        prompts.num_rows - todo.num_rows,
        todo.num_rows,
    )

    run = Counter()
    if todo.num_rows:
        finisher = Finisher(spec, cfg)
        collector = Collector(g.teacher.samples_per_prompt)
        buffer: list[str] = []
        out: dict[str, list] = {"tuples": [], "samples": [], "quarantine": []}
        shard_stats: Counter = Counter()
        bar = _progress(todo.num_rows, progress)
        ds = build_dataset(todo, spec, cfg)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for samples in collector.add(batch):
                finisher.finish(samples, out, shard_stats)
                buffer.append(samples[0][0]["id"])
                bar.update(1)
                if len(buffer) >= g.shard_prompts:
                    store.commit(buffer, out, split_stats(shard_stats))
                    run.update(shard_stats)
                    buffer, out, shard_stats = [], {k: [] for k in out}, Counter()
        if buffer:
            store.commit(buffer, out, split_stats(shard_stats))
            run.update(shard_stats)
        bar.close()
        if collector.pending:  # would mean lost rows: say so rather than drop silently
            raise RuntimeError(f"{collector.pending} prompts did not receive all their rows")
    wall = time.time() - started
    stats = final_stats(store.totals(), bad, split_stats(run), wall)
    storage.write_text(
        storage.join(root, "stats.json"), json.dumps(stats, indent=2, sort_keys=True)
    )
    write_card(root, card_info(cfg, spec), stats["total"])
    return GenerateResult(
        output_dir=root,
        tuples=store.path("tuples"),
        samples=store.path("samples"),
        quarantine=store.path("quarantine"),
        stats_path=storage.join(root, "stats.json"),
        stats=stats,
        teacher=g.teacher.engine.label,
        judge=Finisher.judge_label(g),
        resume_key=store.key,
    )


def resolve_engines(g: GenerateConfig) -> GenerateConfig:
    """Teacher and judge with `kind: auto` resolved once, so data provenance names the engine
    that really ran."""
    teacher = g.teacher.model_copy(
        update={"engine": resolve_engine(g.teacher.engine, "teacher engine")}
    )
    llm = g.judge.llm
    if llm.enabled:
        llm = llm.model_copy(update={"engine": resolve_engine(llm.engine, "judge engine")})
    judge = g.judge.model_copy(update={"llm": llm})
    return g.model_copy(update={"teacher": teacher, "judge": judge})


def warn_if_actors_cannot_fit(g: GenerateConfig) -> None:
    """Ray Data waits forever for CPUs that never come; on a fixed-size cluster say so."""
    import ray

    engines = [g.teacher.engine] + ([g.judge.llm.engine] if g.judge.llm.enabled else [])
    local = [e for e in engines if e.kind == "hf" or (e.kind == "vllm" and e.num_gpus == 0)]
    need = sum(e.num_cpus * e.concurrency for e in local) + LIGHT_CPUS
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        log.warning(
            "the engine actors ask for %.2f logical CPUs plus %.2f for parse/check tasks, "
            "but the cluster has %.2f now: unless it autoscales, the run will wait forever. "
            "Lower engine.num_cpus (torch_threads still sets the threads).",
            need - LIGHT_CPUS,
            LIGHT_CPUS,
            have,
        )


def _table(ds: Any, schema: pa.Schema) -> pa.Table:
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return (
        pa.concat_tables(tables).select(schema.names).cast(schema)
        if tables
        else schema.empty_table()
    )


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="generate: prompts done", unit="prompt", disable=not enabled)


def final_stats(
    total: dict[str, Any], bad_prompts: pa.Table, run: dict[str, Any], wall_s: float
) -> dict[str, Any]:
    """Whole-output counts (all committed shards plus the prompt loader's quarantine) and
    this run's throughput."""
    for part in (total, run):
        for key in COUNTS:
            part.setdefault(key, 0)
        for key in ("quarantine", "rejected", "prompts_by_category", "kept_by_category"):
            part.setdefault(key, {})
    for reason in bad_prompts.column("reason").to_pylist():
        key = "prompts:" + reason.split(" (")[0]
        total["quarantine"][key] = total["quarantine"].get(key, 0) + 1
    prompts, kept = total["prompts"], total["kept"]
    total["acceptance_rate"] = kept / prompts if prompts else 0.0
    total["acceptance_by_category"] = {
        c: total["kept_by_category"].get(c, 0) / n for c, n in total["prompts_by_category"].items()
    }
    generated = run["teacher_generated_tokens"] + run["judge_generated_tokens"]
    run |= {
        "wall_s": round(wall_s, 2),
        "teacher_generated_tokens_per_s": run["teacher_generated_tokens"] / wall_s,
        "generated_tokens_per_s": generated / wall_s,
    }
    return {"total": total, "this_run": run}


def card_info(cfg: Config, spec: Spec) -> dict[str, Any]:
    g: GenerateConfig = cfg.generate  # type: ignore[assignment]
    return {
        "spec_path": cfg.spec.path,
        "variant": cfg.spec.variant,
        "spec_sha": spec.sha,
        "teacher": g.teacher.engine.label,
        "samples_per_prompt": g.teacher.samples_per_prompt,
        "fmt": g.teacher.reasoning_format,
        "judge": Finisher.judge_label(g),
        "threshold": g.judge.threshold,
    }


def summary(result: GenerateResult) -> str:
    """The closing report: counts per reason, acceptance, throughput, where the files are."""
    total, run = result.stats["total"], result.stats["this_run"]
    lines = [
        f"generate: {total['prompts']} prompts done, {total['kept']} tuples "
        f"(acceptance {total['acceptance_rate']:.1%}), {total['judged']} samples judged",
        f"  this run: {run['prompts']} prompts in {run['wall_s']:.1f} s, "
        f"{run['teacher_generated_tokens']} teacher + "
        f"{run['judge_generated_tokens']} judge tokens generated "
        f"({run['generated_tokens_per_s']:.1f} tok/s)",
    ]
    for group in ("quarantine", "rejected"):
        for reason, n in sorted(total[group].items()):
            lines.append(f"  {group:<10} {reason}: {n}")
    lines.append(f"  output: {result.output_dir}")
    return "\n".join(lines)
