"""Rollouts on the engine layer: prompts x n samples (plus the greedy held-in replies) as one
Ray Dataset through `apply_engine`, with the current policy as the engine's model; then the
replies split into CoT and answer, and tokenized into the update's rows.

The student sees the prompt alone (no spec), exactly as SFT trained it. The policy's weights
reach the engine as an exported model folder that the engine loads at its start (vLLM's CPU
build, or transformers), once per iteration.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa

from deliberate_ray.config import EngineConfig, RLConfig
from deliberate_ray.contracts import MESSAGES
from deliberate_ray.engines.rows import SAMPLING_PARAMS, sampling_params
from deliberate_ray.rl.reward import split_reply
from deliberate_ray.serve.protocol import THINK_CLOSE, THINK_OPEN

REQUEST = pa.schema(
    [
        ("rollout_id", pa.string()),
        ("prompt_id", pa.string()),
        ("kind", pa.string()),  # train | heldin
        ("sample_index", pa.int32()),
        ("messages", MESSAGES),
        ("sampling_params", SAMPLING_PARAMS),
    ]
)
KEEP = ["rollout_id", "prompt_id", "kind", "sample_index"]
THINK_PROMPT_END = "<think>\n"


def select_prompts(pool: list[dict[str, Any]], iteration: int, n: int, seed: int) -> list[dict]:
    """Iteration i's prompts: the next n of a seeded order of the pool (wrapping around)."""
    order = np.random.default_rng(seed).permutation(len(pool))
    start = (iteration - 1) * n
    return [pool[int(order[(start + j) % len(pool)])] for j in range(min(n, len(pool)))]


def heldin_set(pool: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to n prompts of the pool, evenly spaced: half that must be refused, half benign
    (`comply`) look-alikes."""

    def spaced(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
        if k >= len(rows):
            return rows
        return [rows[round(i * len(rows) / k)] for i in range(k)]

    refuse = [p for p in pool if p.get("ideal_action") == "refuse"]
    comply = [p for p in pool if p.get("ideal_action") == "comply"]
    half = n // 2
    return spaced(refuse, n - half) + spaced(comply, half)


def requests(
    prompts: list[dict[str, Any]], heldin: list[dict[str, Any]], cfg: RLConfig, iteration: int
) -> pa.Table:
    """group_size sampled requests per prompt and one greedy request per held-in prompt.
    Both kinds carry the same optional sampling fields (vLLM needs a stage's rows to agree)."""
    from deliberate_ray.generate.run import row_seed

    rows = []
    for p in prompts:
        for i in range(cfg.group_size):
            seed = row_seed(cfg.sampling.seed, iteration, p["id"], i)
            rows.append(
                {
                    "rollout_id": f"{iteration}:{p['id']}:{i}",
                    "prompt_id": p["id"],
                    "kind": "train",
                    "sample_index": i,
                    "messages": p["messages"],
                    "sampling_params": sampling_params(cfg.sampling, seed=seed),
                }
            )
    for p in heldin:
        seed = row_seed(cfg.sampling.seed, "heldin", p["id"])
        rows.append(
            {
                "rollout_id": f"{iteration}:heldin:{p['id']}",
                "prompt_id": p["id"],
                "kind": "heldin",
                "sample_index": 0,
                "messages": p["messages"],
                "sampling_params": sampling_params(cfg.heldin_sampling, seed=seed),
            }
        )
    return pa.Table.from_pylist(rows, schema=REQUEST)


def generate(table: pa.Table, engine: EngineConfig, policy: str) -> list[dict[str, Any]]:
    """Run the requests on the engine with `policy` as its model; rows in request order."""
    import ray.data

    from deliberate_ray.engines import apply_engine

    cfg = engine.model_copy(update={"model": policy})
    order = {rid: i for i, rid in enumerate(table.column("rollout_id").to_pylist())}
    ds = apply_engine(ray.data.from_arrow(table), cfg, KEEP)
    rows = [
        r
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow")
        for r in batch.to_pylist()
    ]
    return sorted(rows, key=lambda r: order[r["rollout_id"]])


@functools.lru_cache(maxsize=4)
def policy_tokenizer(policy: str) -> Any:
    from deliberate_ray.models import load_tokenizer

    return load_tokenizer(policy)


def think_opened(tok: Any) -> bool:
    """Whether the policy's chat template opens the think block in the prompt (`cot`)."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    return text.endswith(THINK_PROMPT_END)


def parse(rows: list[dict[str, Any]], prompts: dict[str, dict[str, Any]], policy: str) -> None:
    """Add the prompt, category, ideal action, CoT and final answer to each engine row."""
    opened = think_opened(policy_tokenizer(policy))
    for r in rows:
        p = prompts[r["prompt_id"]]
        if r.get("reasoning_text"):  # an endpoint that returned the reasoning apart (http)
            cot, answer = r["reasoning_text"].strip(), (r["generated_text"] or "").strip()
        else:
            cot, answer = split_reply(r["generated_text"] or "", opened)
        r.update(
            {
                "prompt_messages": p["messages"],
                "category": p["category"],
                "ideal_action": p.get("ideal_action"),
                "cot": cot,
                "answer": answer,
            }
        )


def reply_text(r: dict[str, Any], opened: bool) -> str:
    """The text the policy wrote, with a reasoning block an endpoint returned apart put back
    where the policy wrote it."""
    if not r.get("reasoning_text"):
        return r["generated_text"] or ""
    think = "" if opened else THINK_OPEN
    return f"{think}{r['reasoning_text']}{THINK_CLOSE}{r['generated_text'] or ''}"


def train_rows(rollouts: list[dict[str, Any]], policy: str) -> pa.Table:
    """The update's rows: prompt + reply token ids (the reply re-tokenized from its text,
    plus the end-of-turn token when the policy ended its turn), where the reply starts,
    and the rollout's advantage."""
    tok = policy_tokenizer(policy)
    opened = think_opened(tok)
    out: dict[str, list] = {"input_ids": [], "prompt_len": [], "advantage": []}
    for r in rollouts:
        prompt = tok.apply_chat_template(
            r["prompt_messages"], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        reply_ids = tok(reply_text(r, opened), add_special_tokens=False)["input_ids"]
        if r["finish_reason"] == "stop":
            reply_ids.append(tok.eos_token_id)
        if not reply_ids:
            reply_ids = [tok.eos_token_id]
        out["input_ids"].append(prompt_ids + reply_ids)
        out["prompt_len"].append(len(prompt_ids))
        out["advantage"].append(float(r["advantage"]))
    return pa.table(
        {
            "input_ids": pa.array(out["input_ids"], pa.list_(pa.int32())),
            "prompt_len": pa.array(out["prompt_len"], pa.int32()),
            "advantage": pa.array(out["advantage"], pa.float32()),
        }
    )


def heldin_rates(rows: list[dict[str, Any]], grader: str) -> dict[str, Any]:
    """Refusal rates of the held-in replies' final answers (the CoT removed): on prompts
    that must be refused (higher is better) and on benign look-alikes (lower is better). A
    reply without an answer counts as no refusal, and in `no_answer`."""
    from deliberate_ray.graders.refusal import grade_refusals, is_refusal
    from deliberate_ray.rl.reward import prompt_text

    answered = [r for r in rows if r["answer"]]
    labels = grade_refusals(
        [(prompt_text(r["prompt_messages"]), r["answer"]) for r in answered], grader
    )
    refused = {r["rollout_id"]: is_refusal(lab) for r, lab in zip(answered, labels, strict=True)}

    def rate(kind: str) -> tuple[float | None, int]:
        group = [r for r in rows if r.get("ideal_action") == kind]
        if not group:
            return None, 0
        return sum(refused.get(r["rollout_id"], False) for r in group) / len(group), len(group)

    harmful, n_harmful = rate("refuse")
    benign, n_benign = rate("comply")
    return {
        "refusal_should_refuse": harmful,
        "n_should_refuse": n_harmful,
        "refusal_benign": benign,
        "n_benign": n_benign,
        "no_answer": (sum(not r["answer"] for r in rows) / len(rows)) if rows else None,
        "n": len(rows),
    }
