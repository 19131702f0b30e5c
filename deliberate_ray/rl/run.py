"""`run_rl`: the RL loop after SFT (docs/rl.md). Per iteration:

1. rollout: `group_size` samples per prompt of the iteration (plus greedy replies to the
   held-in prompts) on the engine layer, with the current policy as the engine's model;
2. reward: CoT split off, programmatic checks + the judge on spec(category), prompt and
   final answer (k runs, min), group-normalised advantages;
3. update: Ray Train (FSDP2, optional LoRA) on the rollouts, resuming the previous
   iteration's checkpoint;
4. weight sync: the checkpoint exported as an HF model folder that the next iteration's
   engine loads (the CPU path; docs/rl.md describes the in-place GPU path).

Everything of a run lives in `{rl.output_dir or run_dir/rl}/{arm}/`: `iter_NNNN/`
(rollouts.parquet with rewards and advantages, judge_requests.parquet: the exact requests
the judge engine got, update.json, times.json, metrics.json), Ray Train's checkpoints
`update_NNNN/`, `export/` (the latest policy), `metrics.jsonl` (one row per iteration),
`final.json` (held-in rates of the final policy), `report.md` and `reward_curve.png`. A
rerun continues after the last finished iteration (an iteration's finished parts are reused).
The run folder may be a URI (s3://, gs://): every file above then lives in the bucket, and
the export the next iteration samples with is read back through `resolve_model` (a cached
local copy).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from deliberate_ray import storage
from deliberate_ray.config import (
    Config,
    ConfigError,
    PromptsConfig,
    RLConfig,
    SpecConfig,
    override,
)
from deliberate_ray.results import RLResult
from deliberate_ray.rl.grpo import group_advantages
from deliberate_ray.rl.reward import COMPONENTS, RewardFn, score_rollouts
from deliberate_ray.rl.rollout import (
    generate,
    heldin_rates,
    heldin_set,
    parse,
    requests,
    select_prompts,
    train_rows,
)
from deliberate_ray.rl.update import checkpoint_name, fit_update, update_config

log = logging.getLogger(__name__)
# Engine settings that change no sample: left out of the run's resume key.
THROUGHPUT = {"batch_size", "concurrency", "num_cpus", "kv_cache_gib", "cpu_cores", "torch_threads"}
EXPORT_MARK = "rl_iteration.json"


def init_ref(cfg: Config, rl: RLConfig) -> str:
    """The reference of the model RL starts from: rl.init_model, else the arm's SFT export."""
    return rl.init_model or storage.join(cfg.run_dir, "train", rl.arm, "export")


def resolve_init(cfg: Config, rl: RLConfig) -> str:
    """The model RL starts from (a local folder, or a local copy of a URI's), resolved."""
    from deliberate_ray.models import ModelRefError, resolve_model

    ref = init_ref(cfg, rl)
    there = storage.exists(ref) if storage.is_remote(ref) else Path(ref).is_dir()
    if rl.init_model is None and not there:
        raise ConfigError(
            "rl.init_model",
            [f"null, and {ref} does not exist -> train the arm first or set rl.init_model"],
        )
    try:
        return resolve_model(ref)
    except ModelRefError as e:
        raise ConfigError(
            "rl.init_model",
            [f"{e} -> train the arm first (deliberate-ray train / pipeline) or set rl.init_model"],
        ) from None


def run_key(rl: RLConfig, init: str, spec_sha: str, variant: str) -> str:
    """What the samples and updates of a run depend on (not how many iterations it runs,
    nor engine throughput settings): a rerun with another key is refused."""
    engine_skip = {k: True for k in THROUGHPUT | {"model"}}
    dump = rl.model_dump(
        mode="json",
        exclude={
            "iterations": True,
            "keep_checkpoints": True,
            "engine": engine_skip,
            "reward": {"judge": {"engine": {k: True for k in THROUGHPUT}}},
        },
    )
    blob = json.dumps([dump, init, spec_sha, variant], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_key(out_dir: str, key: str) -> None:
    path = storage.join(out_dir, "run.json")
    if storage.exists(path):
        old = json.loads(storage.read_text(path)).get("key")
        if old != key:
            raise ConfigError(
                f"rl run {out_dir}",
                [
                    f"was started with another rl config, init model or spec (key {old}, now "
                    f"{key}) -> use another rl.output_dir or arm, or delete the folder"
                ],
            )
    storage.makedirs(out_dir)
    storage.write_text(path, json.dumps({"key": key}))


def load_pool(
    cfg: Config, rl: RLConfig, categories: list[str], eval_suites: Sequence[str] = ()
) -> list[dict[str, Any]]:
    from deliberate_ray.contracts import PROMPT
    from deliberate_ray.generate.run import _table, guard_eval_only
    from deliberate_ray.prompts import load_prompts

    pcfg = override(cfg.prompts, "prompts", sources=rl.prompts or None)
    table = _table(load_prompts(pcfg, categories).prompts, PROMPT)
    if table.num_rows == 0:
        raise ConfigError("rl.prompts", [f"no valid prompts in {pcfg.sources}"])
    guard_eval_only(table, cfg, eval_suites)
    return table.to_pylist()


def add_advantages(rollouts: list[dict[str, Any]], group_size: int, scale: bool) -> int:
    """Group-normalised advantages (rollouts come in groups of `group_size` per prompt, in
    order); returns how many groups had equal rewards (no signal)."""
    if not rollouts:
        return 0
    rewards = torch.tensor([r["reward"] for r in rollouts], dtype=torch.float64)
    rewards = rewards.view(-1, group_size)
    adv = group_advantages(rewards, scale=scale).flatten().tolist()
    for r, a in zip(rollouts, adv, strict=True):
        r["advantage"] = a
    return int((rewards.std(dim=1, unbiased=False) == 0).sum())


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows with different keys (held-in rows have no reward) as one table, nulls filled."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])


def iteration_metrics(out_dir: str) -> list[str]:
    """`iter_*/metrics.json` of a run folder (local or a URI), in iteration order."""
    if not storage.is_remote(out_dir):
        return [str(p) for p in sorted(Path(out_dir).glob("iter_*/metrics.json"))]
    fs, path = storage.filesystem(out_dir)
    fs.invalidate_cache()
    found = fs.glob(f"{path.rstrip('/')}/iter_*/metrics.json")
    fs.invalidate_cache()  # leave no listing behind that later writes by workers would outdate
    return sorted(storage.join(out_dir, *p[len(path.rstrip("/")) + 1 :].split("/")) for p in found)


def mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


class RLRun:
    """One RL run folder and its loop."""

    def __init__(
        self,
        cfg: Config,
        rl: RLConfig,
        out_dir: str,
        reward_fn: RewardFn | None,
        eval_suites: Sequence[str] = (),
    ):
        from deliberate_ray.models import portable_ref
        from deliberate_ray.spec import load_spec

        self.cfg, self.rl, self.out = cfg, rl, out_dir
        # The model RL starts from (resolve_init has checked it). Rollout engines and the
        # update's workers get the portable form of its reference and resolve that on their
        # own node: a URI or the embedded model into that node's cache (see train.run).
        self.init = portable_ref(init_ref(cfg, rl))
        self.reward_fn = reward_fn
        self.spec = load_spec(cfg.spec.path)
        self.pool = load_pool(cfg, rl, self.spec.category_ids, eval_suites)
        self.by_id = {p["id"]: p for p in self.pool}
        self.heldin = heldin_set(self.pool, rl.heldin_prompts)
        self.tcfg = update_config(rl, self.init)

    def path(self, *parts: str) -> str:
        """A file or folder of the run (a local path or a URI)."""
        return storage.join(self.out, *parts)

    def iter_dir(self, i: int) -> str:
        return self.path(f"iter_{i:04d}")

    def done(self, i: int) -> bool:
        return storage.exists(storage.join(self.iter_dir(i), "metrics.json"))

    # ---------------------------------------------------------- weights

    def export(self, checkpoint: Any, i: int) -> str:
        """Weight sync, CPU path: the checkpoint as an HF folder the next engine loads."""
        from deliberate_ray.train.run import export_on_worker

        info = export_on_worker(checkpoint, self.tcfg, self.path("export"))
        # Written after the whole export: the mark says which iteration's weights it holds.
        storage.write_text(
            storage.join(info["export_dir"], EXPORT_MARK), json.dumps({"iteration": i})
        )
        return info["export_dir"]

    def policy_for(self, i: int) -> str:
        """The model that samples iteration i: the SFT model, then the latest export (made
        again from the previous update's checkpoint if a run died before exporting it)."""
        if i == 1:
            return self.init
        export = self.path("export")
        mark = storage.join(export, EXPORT_MARK)
        if storage.exists(mark) and json.loads(storage.read_text(mark))["iteration"] == i - 1:
            return export  # a URI is read through resolve_model (a cached local copy)
        import ray.train

        ckpt = self.path(checkpoint_name(i - 1))
        if not storage.exists(ckpt):
            raise RuntimeError(f"iteration {i}: no export and no checkpoint {ckpt} to make one")
        log.info("rl: exporting %s again (the run stopped before exporting it)", ckpt)
        return self.export(ray.train.Checkpoint(path=ckpt), i - 1)

    # ---------------------------------------------------------- one iteration

    def rollouts(self, i: int, policy: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Iteration i's rollouts with rewards and advantages (reused if already written)."""
        d = self.iter_dir(i)
        path = storage.join(d, "rollouts.parquet")
        if storage.exists(path):
            reward = json.loads(storage.read_text(storage.join(d, "reward.json")))
            return storage.read_table(path).to_pylist(), reward
        rl = self.rl
        prompts = select_prompts(self.pool, i, rl.prompts_per_iteration, rl.seed)
        log.info(
            "rl iteration %d: %d prompts x %d rollouts + %d held-in replies, policy %s",
            i,
            len(prompts),
            rl.group_size,
            len(self.heldin),
            policy,
        )
        t0 = time.perf_counter()
        rows = generate(requests(prompts, self.heldin, rl, i), rl.engine, policy)
        parse(rows, self.by_id, policy)
        rollout_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        train = [r for r in rows if r["kind"] == "train"]
        storage.makedirs(d)
        judge = score_rollouts(
            train,
            self.spec,
            self.cfg.spec.variant,
            rl.reward,
            self.reward_fn,
            record=storage.join(d, "judge_requests.parquet"),
        )
        flat = add_advantages(train, rl.group_size, rl.advantage_std)
        reward_s = time.perf_counter() - t0
        info = {
            "rollout_s": round(rollout_s, 2),
            "reward_s": round(reward_s, 2),
            "judge_unreadable": judge["judge_unreadable"],
            "judge_tokens": judge["judge_tokens"],
            "judge_requests": (
                judge["judge_requests"].num_rows if judge["judge_requests"] is not None else 0
            ),
            "groups_without_signal": flat,
        }
        storage.write_text(storage.join(d, "reward.json"), json.dumps(info, indent=2))
        # The file that marks the phase done: written whole (temp + rename, or one upload).
        storage.write_table(path, to_table(rows))
        return rows, info

    def update(self, i: int, policy: str, train: list[dict[str, Any]]) -> tuple[Any, dict]:
        """The update on Ray Train (skipped when its checkpoint is already there)."""
        import ray.train

        d = self.iter_dir(i)
        update_json = storage.join(d, "update.json")
        ckpt = self.path(checkpoint_name(i))
        if storage.exists(update_json) and storage.exists(ckpt):
            log.info("rl iteration %d: update done earlier (%s)", i, ckpt)
            return ray.train.Checkpoint(path=ckpt), json.loads(storage.read_text(update_json))
        result = fit_update(self.rl, self.tcfg, train_rows(train, policy), i, self.out, d)
        if result.checkpoint is None:
            raise RuntimeError(f"rl iteration {i}: the update wrote no checkpoint")
        return result.checkpoint, json.loads(storage.read_text(update_json))

    def iteration(self, i: int) -> dict[str, Any]:
        started = time.perf_counter()
        policy = self.policy_for(i)
        rows, info = self.rollouts(i, policy)
        train = [r for r in rows if r["kind"] == "train"]
        held = [r for r in rows if r["kind"] == "heldin"]
        t0 = time.perf_counter()
        checkpoint, upd = self.update(i, policy, train)
        update_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.export(checkpoint, i)
        sync_s = time.perf_counter() - t0
        generated = sum(r["num_generated_tokens"] or 0 for r in rows)
        lengths = [r["num_generated_tokens"] or 0 for r in train]
        row = {
            "iteration": i,
            "policy": policy,
            "prompts": len(train) // self.rl.group_size,
            "rollouts": len(train),
            "reward_mean": mean([r["reward"] for r in train]),
            "reward_std": float(torch.tensor([r["reward"] for r in train]).std(unbiased=False)),
            "reward_components": {c: mean([r[f"r_{c}"] for r in train]) for c in COMPONENTS},
            "groups_without_signal": info["groups_without_signal"],
            "judge_sees_cot": self.rl.reward.judge_sees_cot,
            "judge_unreadable": info["judge_unreadable"],
            "judge_requests": info["judge_requests"],
            "response_tokens_mean": sum(lengths) / max(1, len(lengths)),
            "truncation_rate": mean([float(r["finish_reason"] == "length") for r in train]),
            "no_answer_rate": mean([float(not r["answer"]) for r in train]),
            "cot_rate": mean([float(bool(r["cot"])) for r in train]),
            "engine_errors": sum(bool(r["engine_error"]) for r in rows),
            "heldin": heldin_rates(held, self.rl.heldin_grader) if held else None,
            **{k: upd[k] for k in ("kl_rollout", "kl_update", "loss", "clip_frac", "grad_norm")},
            "kl": upd["kl_rollout"],
            "update_steps": upd["update_steps"],
            "optimizer_steps_total": upd["step"],
            "rollout_tokens": generated,
            "rollout_tokens_per_s": generated / info["rollout_s"] if info["rollout_s"] else None,
            "time_s": {
                "rollout": info["rollout_s"],
                "reward": info["reward_s"],
                "update": round(update_s, 2),
                "sync": round(sync_s, 2),
                "iteration": round(time.perf_counter() - started, 2),
            },
            "time": time.time(),
        }
        metrics_json = storage.join(self.iter_dir(i), "metrics.json")
        storage.write_text(metrics_json, json.dumps(row, indent=2))
        return row

    # ---------------------------------------------------------- the loop

    def metrics(self) -> list[dict[str, Any]]:
        rows = [json.loads(storage.read_text(p)) for p in iteration_metrics(self.out)]
        storage.write_text(self.path("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def final_heldin(self) -> dict[str, Any] | None:
        """Held-in refusal rates of the final policy (once all iterations are done)."""
        n = self.rl.iterations
        path = self.path("final.json")
        if storage.exists(path):
            doc = json.loads(storage.read_text(path))
            if doc.get("iteration") == n:
                return doc
        if not self.heldin:
            return None
        policy = self.policy_for(n + 1)
        t0 = time.perf_counter()
        rows = generate(requests([], self.heldin, self.rl, n + 1), self.rl.engine, policy)
        parse(rows, self.by_id, policy)
        doc = {
            "iteration": n,
            "policy": policy,
            "heldin": heldin_rates(rows, self.rl.heldin_grader),
            "wall_s": round(time.perf_counter() - t0, 2),
        }
        storage.write_table(self.path("final_heldin.parquet"), to_table(rows))
        storage.write_text(path, json.dumps(doc, indent=2))
        return doc

    def run(self, stop_after: int | None) -> RLResult:
        last = min(self.rl.iterations, stop_after or self.rl.iterations)
        for i in range(1, last + 1):
            if self.done(i):
                log.info("rl iteration %d: done earlier, skipped", i)
                continue
            row = self.iteration(i)
            comps = ", ".join(
                f"{c} {v:.3f}" for c, v in row["reward_components"].items() if v is not None
            )
            log.info(
                "rl iteration %d/%d: reward %.3f (%s), kl %.4f, %.0f tokens/reply, "
                "truncated %.0f%%, %.0f s (rollout %.0f, reward %.0f, update %.0f, sync %.0f)",
                i,
                self.rl.iterations,
                row["reward_mean"],
                comps,
                row["kl"],
                row["response_tokens_mean"],
                100 * row["truncation_rate"],
                row["time_s"]["iteration"],
                row["time_s"]["rollout"],
                row["time_s"]["reward"],
                row["time_s"]["update"],
                row["time_s"]["sync"],
            )
        rows = self.metrics()
        finished = len(rows) == self.rl.iterations and all(self.done(i) for i in range(1, last + 1))
        final = self.final_heldin() if finished else None
        report = write_rl_report(self.out, self.rl, self.init, rows, final)
        return RLResult(
            **{
                "arm": self.rl.arm,
                "run_dir": self.out,
                "init_model": self.init,
                "iterations_done": len(rows),
                "iterations": self.rl.iterations,
                "finished": finished,
                "export_dir": self.path("export") if rows else None,
                "metrics_path": self.path("metrics.jsonl"),
                "reward_curve": [r["reward_mean"] for r in rows],
                "heldin_before": rows[0]["heldin"] if rows else None,
                "heldin_after": final["heldin"] if final else None,
                "judge_sees_cot": self.rl.reward.judge_sees_cot,
                "report": report,
            }
        )


def run_rl(
    section: RLConfig,
    run_dir: str,
    *,
    spec: SpecConfig,
    prompts: PromptsConfig,
    eval_suites: Sequence[str] = (),
    stop_after: int | None = None,
    reward_fn: RewardFn | None = None,
) -> RLResult:
    """Run (or continue) RL on the arm `section.arm`'s SFT model (`section.init_model`, else
    {run_dir}/train/<arm>/export) into `{section.output_dir or run_dir/rl}/<arm>`, on the run's
    spec and prompt pool (unless `section.prompts`; `eval_suites` are refused as prompts).
    Returns the run's summary: export, reward curve, held-in rates before/after, report.

    `stop_after` ends this call after that iteration (rerun to go on); `reward_fn` adds a
    programmatic `custom` reward component computed from each rollout row."""
    import ray

    from deliberate_ray.engines import resolve_engine
    from deliberate_ray.runlock import RunLock
    from deliberate_ray.spec import load_spec

    cfg = Config(run_dir=run_dir, spec=spec, prompts=prompts, rl=section)
    rl = section
    w = rl.reward.weights
    if reward_fn is None and w.action + w.format + (w.judge if rl.reward.judge.enabled else 0) <= 0:
        raise ConfigError("rl.reward.weights", ["only `custom` is weighted, but no reward_fn"])
    init = resolve_init(cfg, rl)
    judge = rl.reward.judge
    if judge.enabled:
        judge = judge.model_copy(update={"engine": resolve_engine(judge.engine, "judge engine")})
    rl = rl.model_copy(
        update={
            "engine": resolve_engine(rl.engine, "rollout engine"),
            "reward": rl.reward.model_copy(update={"judge": judge}),
        }
    )
    # A local folder or a URI (s3://, gs://): every file of the run, and Ray Train's update
    # checkpoints, go there.
    parent = storage.absolute(rl.output_dir or storage.join(cfg.run_dir, "rl"))
    out_dir = storage.absolute(storage.join(parent, rl.arm))
    if not ray.is_initialized():
        ray.init()
    spec_sha = load_spec(cfg.spec.path).sha
    with RunLock(out_dir, "rl"):
        # A URI's local copy lives in this machine's cache: the key names the URI instead.
        ref = init_ref(cfg, rl)
        key = run_key(rl, ref if storage.is_remote(ref) else init, spec_sha, cfg.spec.variant)
        check_key(out_dir, key)
        return RLRun(cfg, rl, out_dir, reward_fn, eval_suites).run(stop_after)


# ------------------------------------------------------------------ report


def plot_rewards(rows: list[dict[str, Any]], path: str) -> bool:
    """The reward curve as a PNG at `path` (a local file or a URI); False without rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return False
    x = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, [r["reward_mean"] for r in rows], marker="o", linewidth=2, label="reward")
    for c in COMPONENTS:
        values = [r["reward_components"].get(c) for r in rows]
        if any(v is not None for v in values):
            ax.plot(x, values, marker=".", linestyle="--", label=c)
    ax.set_xlabel("RL iteration")
    ax.set_ylabel("mean over rollouts")
    ax.set_title("RL reward per iteration")
    ax.set_xticks(x)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
    return True


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_rl_report(
    out_dir: str,
    rl: RLConfig,
    init: str,
    rows: list[dict[str, Any]],
    final: dict[str, Any] | None,
) -> str:
    from deliberate_ray.evals.report import table

    lines = [
        f"# RL report: `{rl.arm}`",
        "",
        f"- start: `{init}`; policy now: `{storage.join(out_dir, 'export')}`",
        f"- {len(rows)} of {rl.iterations} iterations; {rl.prompts_per_iteration} prompts x "
        f"{rl.group_size} rollouts each; KL coefficient {rl.kl_coef}, clip {rl.clip_eps}, "
        f"lr {rl.lr}, LoRA {'on' if rl.lora.enabled else 'off'}, {rl.num_workers} worker(s)",
        f"- judge: {'LLM judge k=' + str(rl.reward.judge.k) if rl.reward.judge.enabled else 'off'}"
        f" ({'sees the CoT: ablation' if rl.reward.judge_sees_cot else 'CoT hidden'}); "
        f"weights {rl.reward.weights.model_dump()}",
        "",
        "## Reward per iteration",
        "",
    ]
    if plot_rewards(rows, storage.join(out_dir, "reward_curve.png")):
        lines += ["![reward curve](reward_curve.png)", ""]
    lines += table(
        [
            "iter",
            "reward",
            *COMPONENTS,
            "KL",
            "tokens/reply",
            "truncated",
            "no answer",
            "rollout s",
            "reward s",
            "update s",
            "sync s",
            "rollout tok/s",
        ],
        [
            [
                str(r["iteration"]),
                f"{r['reward_mean']:.3f} ± {r['reward_std']:.3f}",
                *[_f(r["reward_components"].get(c)) for c in COMPONENTS],
                _f(r["kl"], 4),
                f"{r['response_tokens_mean']:.0f}",
                _f(r["truncation_rate"], 2),
                _f(r["no_answer_rate"], 2),
                *[f"{r['time_s'][k]:.0f}" for k in ("rollout", "reward", "update", "sync")],
                _f(r["rollout_tokens_per_s"], 1),
            ]
            for r in rows
        ],
    )
    lines += [
        "## Held-in refusal rates",
        "",
        "Greedy replies of the policy to held-in prompts of the pool, the CoT removed, graded "
        f"by the `{rl.heldin_grader}` refusal grader. Should refuse: higher is better; "
        "benign look-alikes: lower is better; a reply without an answer counts as no refusal.",
        "",
    ]
    held = [(f"before iteration {r['iteration']}", r.get("heldin")) for r in rows]
    if final:
        held.append((f"after iteration {final['iteration']} (final)", final["heldin"]))
    lines += table(
        ["policy", "refusal (should refuse)", "refusal (benign)", "no answer", "n"],
        [
            [
                name,
                f"{_f(h['refusal_should_refuse'], 2)} (n={h['n_should_refuse']})",
                f"{_f(h['refusal_benign'], 2)} (n={h['n_benign']})",
                _f(h["no_answer"], 2),
                str(h["n"]),
            ]
            for name, h in held
            if h
        ],
    )
    path = storage.join(out_dir, "report.md")
    storage.write_text(path, "\n".join(lines))
    return path


def summary_text(summary: RLResult) -> str:
    """What `deliberate-ray rl` prints at the end."""
    curve = ", ".join(_f(v) for v in summary.reward_curve)
    lines = [
        f"rl {summary.arm}: {summary.iterations_done} of {summary.iterations} "
        f"iterations; reward per iteration: {curve}",
    ]
    for name in ("heldin_before", "heldin_after"):
        h = getattr(summary, name)
        if h:
            lines.append(
                f"  held-in {name.split('_')[1]}: refusal should-refuse "
                f"{_f(h['refusal_should_refuse'], 2)}, benign {_f(h['refusal_benign'], 2)}, "
                f"no answer {_f(h['no_answer'], 2)}"
            )
    lines += [f"  policy: {summary.export_dir}", f"  report: {summary.report}"]
    return "\n".join(lines)
