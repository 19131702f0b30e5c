"""The spec-document stage (`deliberate-ray docs`) for Model Spec Midtraining (docs/msm.md).

plan (per policy and for the spec as a whole, per variant: a document type, rotating over
`doc_types`, and an idea: a title from the engine) -> write (the relevant spec text in
context) -> checks (length, policy ids the spec does not have) -> optional LLM judge (does
the document agree with the spec text?) -> near-duplicate removal -> committed shards.

One lazy Ray Data Dataset on the engine layer, as in generate: rows stream back to the
driver, which filters and commits them shard by shard (`generate.store.ShardStore`), so a
rerun resumes after the committed documents. Beside the documents the stage writes chat
rows (the student's own replies to benign prompts of the pool) that the midtraining mixes
in, so the student keeps its conversational ability.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from deliberate_ray import storage
from deliberate_ray.config import (
    Config,
    DocsConfig,
    PromptsConfig,
    SamplingConfig,
    SpecConfig,
)
from deliberate_ray.contracts import MESSAGES, QUARANTINE, quarantine_row, stable_id
from deliberate_ray.engines import apply_engine, resolve_engine
from deliberate_ray.engines.rows import SAMPLING_PARAMS, sampling_params
from deliberate_ray.generate.run import light_stage, row_seed
from deliberate_ray.generate.store import ShardStore, _atomic_write
from deliberate_ray.judge import expected_score
from deliberate_ray.results import DocsResult
from deliberate_ray.spec import CITATION, Spec, fold, load_spec

log = logging.getLogger(__name__)

SPEC_TOPIC = "spec"  # the topic of documents about the spec as a whole
TITLE_PREFILL = "Title:"
SCORE_PREFILL = "Score:"
WORDS_PER_DOC = 200
JUDGE_LOGPROBS = 20  # top tokens read at the digit after "Score:" (judge.expected_score)
JUDGE_TASK = (
    "Rate whether the document below agrees with the policy text above: what it says the "
    'assistant does and why. Reply with "Score: " and one digit from 0 (it contradicts the '
    "policy or invents rules) to 9 (it agrees with the policy and explains it correctly)."
)
DOC = pa.schema(
    [
        ("id", pa.string()),
        ("variant", pa.string()),
        ("topic", pa.string()),  # a policy id, or "spec"
        ("category", pa.string()),  # the policy's category; null for the spec as a whole
        ("doc_type", pa.string()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("words", pa.int32()),
        ("truncated", pa.bool_()),
        ("judge_score", pa.float64()),
        ("spec_sha", pa.string()),
        ("writer", pa.string()),
        ("created_at", pa.string()),
    ]
)
CHAT = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MESSAGES),  # the prompt, then the student's reply (the trained turn)
        ("category", pa.string()),
        ("writer", pa.string()),
        ("created_at", pa.string()),
    ]
)
ITEM_COLS = [
    pa.field("id", pa.string()),
    pa.field("kind", pa.string()),  # doc | chat
    pa.field("variant", pa.string()),
    pa.field("topic", pa.string()),
    pa.field("category", pa.string()),
    pa.field("doc_type", pa.string()),
    pa.field("source_text", pa.string()),
    pa.field("prompt_messages", MESSAGES),
    pa.field("title", pa.string()),
]
REQUEST = pa.schema(
    [*ITEM_COLS, pa.field("messages", MESSAGES), pa.field("sampling_params", SAMPLING_PARAMS)]
)
WRITTEN_COLS = [
    *ITEM_COLS,
    pa.field("text", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("writer_error", pa.string()),
    pa.field("generated_tokens", pa.int32()),
]
JUDGE_REQUEST = pa.schema(
    [*WRITTEN_COLS, pa.field("messages", MESSAGES), pa.field("sampling_params", SAMPLING_PARAMS)]
)
JUDGED = pa.schema(
    [*WRITTEN_COLS, pa.field("judge_score", pa.float64()), pa.field("judge_note", pa.string())]
)


def documents_table(variant: str) -> str:
    return f"documents_{variant}"


# ------------------------------------------------------------------ plan


def policy_text(spec: Spec, policy_id: str, variant: str) -> str:
    """The spec text a document about one policy is written from: its category, the rule,
    the ideal actions and (values) the rationale."""
    category = spec.category(spec.category_of_policy(policy_id) or "")
    policy = next(p for p in category.policies if p.id == policy_id)
    lines = [
        f"# {spec.name}",
        f"Category: {category.title} ({category.prefix}): {fold(category.summary)}",
        f"Policy {policy.id}: {fold(policy.rule)}",
    ]
    if variant == "values":
        lines.append(f"Why this policy exists: {fold(policy.rationale)}")
    lines.append(f"Ideal action: {' or '.join(policy.actions)}")
    return "\n".join(lines)


def spec_text(spec: Spec, variant: str) -> str:
    """The spec text a document about the whole spec is written from."""
    lines = [f"# {spec.name}", fold(spec.overview), "", "Categories:"]
    for c in spec.categories:
        ids = ", ".join(p.id for p in c.policies)
        lines.append(f"- {c.title} ({ids}): {fold(c.summary)}")
    if variant == "values":
        lines += ["", "Style:", f"- Refusals: {fold(spec.style.hard_refusal)}"]
        lines.append(f"- Benign requests: {fold(spec.style.full_compliance)}")
    return "\n".join(lines)


def plan_documents(spec: Spec, d: DocsConfig) -> list[dict[str, Any]]:
    """Every document to write: (variant, topic, type) with the spec text it is written
    from. Types rotate over `doc_types`, so a policy's documents differ in type and the
    corpus covers every type."""
    items: list[dict[str, Any]] = []
    policies = [(c.id, p.id) for c in spec.categories for p in c.policies]
    types = d.doc_types
    for variant in d.variants:
        for n, (category, pid) in enumerate(policies):
            for i in range(d.per_policy):
                doc_type = types[(n * d.per_policy + i) % len(types)]
                items.append(
                    doc_item(variant, pid, category, doc_type, i, policy_text(spec, pid, variant))
                )
        for j in range(d.spec_wide):
            doc_type = types[j % len(types)]
            items.append(doc_item(variant, SPEC_TOPIC, None, doc_type, j, spec_text(spec, variant)))
    return items


def doc_item(
    variant: str, topic: str, category: str | None, doc_type: str, index: int, source: str
) -> dict[str, Any]:
    return {
        "id": stable_id(variant, topic, doc_type, index, prefix="d"),
        "kind": "doc",
        "variant": variant,
        "topic": topic,
        "category": category,
        "doc_type": doc_type,
        "source_text": source,
        "prompt_messages": None,
        "title": None,
    }


def chat_items(cfg: Config, spec: Spec, eval_suites: Sequence[str] = ()) -> list[dict[str, Any]]:
    """`chat.prompts` benign (`comply`) prompts of the pool, evenly spaced."""
    from deliberate_ray.contracts import PROMPT
    from deliberate_ray.generate.run import _table, guard_eval_only
    from deliberate_ray.prompts import load_prompts

    n = cfg.docs.chat.prompts  # type: ignore[union-attr]
    if n == 0:
        return []
    prompts = _table(load_prompts(cfg.prompts, spec.category_ids).prompts, PROMPT)
    guard_eval_only(prompts, cfg, eval_suites)
    benign = [r for r in prompts.to_pylist() if r["ideal_action"] == "comply"]
    if not benign:
        log.warning("docs: the prompt pool has no `comply` prompts; no chat rows written")
        return []
    step = max(1.0, len(benign) / n)
    picked = [benign[int(i * step)] for i in range(min(n, len(benign)))]
    return [
        {
            "id": stable_id("chat", r["id"], prefix="c"),
            "kind": "chat",
            "variant": None,
            "topic": None,
            "category": r["category"],
            "doc_type": None,
            "source_text": None,
            "prompt_messages": r["messages"],
            "title": None,
        }
        for r in picked
    ]


# ------------------------------------------------------------------ dataset stages


def seed_for(d: DocsConfig, *parts: Any) -> int | None:
    """A per-row seed when the docs or chat sampling has one. All rows of an engine stage,
    skipped ones included, must agree on having a seed (engines/vllm.py `_prepare`)."""
    base = d.sampling.seed if d.sampling.seed is not None else d.chat.sampling.seed
    return row_seed(base, *parts)


SKIP_MESSAGES = [{"role": "user", "content": "-"}]


def skip(r: dict[str, Any], seed: int | None = None, logprobs: int | None = None) -> dict[str, Any]:
    """A row that passes an engine stage without generating (max_tokens 0)."""
    params = sampling_params(SamplingConfig(max_tokens=1), seed=seed, logprobs=logprobs)
    return r | {"messages": SKIP_MESSAGES, "sampling_params": params | {"max_tokens": 0}}


def write_instruction(item: dict[str, Any], words: int) -> str:
    if item["topic"] == SPEC_TOPIC:
        subject = "the assistant spec above as a whole: what it asks of the assistant"
    else:
        subject = f"policy {item['topic']} of the spec above"
    why = (
        "Explain what it says and why it exists: the reasons and values behind it."
        if item["variant"] == "values"
        else "Explain what it says and how it applies, with a concrete example."
    )
    cite = "Refer to policies by their ids (like " + (
        "VIO-1)." if item["topic"] == SPEC_TOPIC else f"{item['topic']})."
    )
    return f"Write a {item['doc_type']} about {subject}. {why} {cite} About {words} words."


def plan_requests(batch: pa.Table, d: DocsConfig) -> pa.Table:
    """Document items -> a title request each (chat rows pass through, skipped)."""
    rows = []
    stop = ["\n"]
    for r in batch.to_pylist():
        if r["kind"] != "doc":
            rows.append(skip(r, seed_for(d, r["id"], "plan")))
            continue
        task = write_instruction(r, WORDS_PER_DOC).replace("Write a", "Suggest a title for a", 1)
        messages = [
            {"role": "system", "content": r["source_text"]},
            {"role": "user", "content": task + " Reply with the title only."},
            {"role": "assistant", "content": TITLE_PREFILL},
        ]
        plan = d.sampling.model_copy(update={"max_tokens": d.plan_max_tokens, "stop": stop})
        params = sampling_params(plan, seed=seed_for(d, r["id"], "plan"))
        rows.append(r | {"messages": messages, "sampling_params": params})
    return pa.Table.from_pylist(rows, schema=REQUEST)


def clean_title(text: str) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line.strip().strip("\"'*#").strip()[:160]


def write_requests(batch: pa.Table, d: DocsConfig, writer_runs_chat: bool) -> pa.Table:
    """Items (with a planned title when `plan`) -> the writer's requests. Chat rows are
    answered here when the writer is the chat engine too, else skipped."""
    rows = []
    for r in batch.to_pylist():
        if "generated_text" in r:  # after the plan pass: its title
            r = {f.name: r.get(f.name) for f in ITEM_COLS} | {
                "title": clean_title(r["generated_text"]) if r["kind"] == "doc" else None
            }
        if r["kind"] == "chat":
            rows.append(
                r | chat_request(r, d) if writer_runs_chat else skip(r, seed_for(d, r["id"]))
            )
            continue
        prefill = f"{TITLE_PREFILL} {r['title']}\n\n" if r.get("title") else TITLE_PREFILL
        messages = [
            {"role": "system", "content": r["source_text"]},
            {"role": "user", "content": write_instruction(r, WORDS_PER_DOC)},
            {"role": "assistant", "content": prefill},
        ]
        params = sampling_params(d.sampling, seed=seed_for(d, r["id"]))
        rows.append(r | {"messages": messages, "sampling_params": params})
    return pa.Table.from_pylist(rows, schema=REQUEST)


def chat_request(r: dict[str, Any], d: DocsConfig) -> dict[str, Any]:
    return {
        "messages": r["prompt_messages"],
        "sampling_params": sampling_params(d.chat.sampling, seed=seed_for(d, r["id"])),
    }


def split_title(item: dict[str, Any], generated: str) -> tuple[str, str]:
    """(title, body) of a written document: a planned title was prefilled; otherwise the
    writer's first line is its title."""
    if item.get("title"):
        return item["title"], generated.strip()
    head, _, body = (generated or "").strip().partition("\n")
    return clean_title(head), body.strip()


def written(batch: pa.Table) -> pa.Table:
    """Writer output -> text (a document's body or a chat reply) per row."""
    rows = []
    for r in batch.to_pylist():
        row = {f.name: r.get(f.name) for f in ITEM_COLS}
        text = r["generated_text"] or ""
        if r["kind"] == "doc" and r["finish_reason"] != "skipped":
            title, text = split_title(r, text)
            row["title"] = title
        rows.append(row | engine_text(r, text))
    return pa.Table.from_pylist(rows, schema=pa.schema(WRITTEN_COLS))


def engine_text(r: dict[str, Any], text: str) -> dict[str, Any]:
    """The written columns of one engine output row."""
    return {
        "text": text,
        "finish_reason": r["finish_reason"],
        "writer_error": r["engine_error"],
        "generated_tokens": r["num_generated_tokens"],
    }


def chat_answers(batch: pa.Table) -> pa.Table:
    """A separate chat engine's output -> the chat rows' text (doc rows pass through)."""
    rows = []
    for r in batch.to_pylist():
        row = {f.name: r.get(f.name) for f in WRITTEN_COLS}
        if r["kind"] == "chat":
            row |= engine_text(r, r["generated_text"] or "")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=pa.schema(WRITTEN_COLS))


def chat_requests(batch: pa.Table, d: DocsConfig) -> pa.Table:
    rows = []
    for r in batch.to_pylist():
        rows.append(
            r | chat_request(r, d) if r["kind"] == "chat" else skip(r, seed_for(d, r["id"]))
        )
    return pa.Table.from_pylist(rows, schema=JUDGE_REQUEST)


def judge_requests(batch: pa.Table) -> pa.Table:
    """Written documents -> one greedy digit request each (chat rows and failed documents
    are skipped)."""
    greedy = SamplingConfig(max_tokens=3, temperature=0.0, top_p=1.0)
    rows = []
    for r in batch.to_pylist():
        if r["kind"] != "doc" or r["writer_error"] or not (r["text"] or "").strip():
            rows.append(skip(r, logprobs=JUDGE_LOGPROBS))
            continue
        messages = [
            {"role": "system", "content": r["source_text"] + "\n\n" + JUDGE_TASK},
            {"role": "user", "content": f"Document:\n{r['title'] or ''}\n\n{r['text']}"},
            {"role": "assistant", "content": SCORE_PREFILL},
        ]
        rows.append(
            r
            | {
                "messages": messages,
                "sampling_params": sampling_params(greedy, logprobs=JUDGE_LOGPROBS),
            }
        )
    return pa.Table.from_pylist(rows, schema=JUDGE_REQUEST)


def judgements(batch: pa.Table) -> pa.Table:
    rows = []
    for r in batch.to_pylist():
        row = {f.name: r.get(f.name) for f in WRITTEN_COLS}
        if r["finish_reason"] == "skipped":
            rows.append(row | {"judge_score": None, "judge_note": None})
        elif r["engine_error"]:
            rows.append(
                row
                | {"judge_score": None, "judge_note": f"judge engine error: {r['engine_error']}"}
            )
        else:
            score, note = expected_score(r["top_logprobs"])
            rows.append(row | {"judge_score": score, "judge_note": note})
    return pa.Table.from_pylist(rows, schema=JUDGED)


def build_dataset(items: list[dict[str, Any]], d: DocsConfig, shard: int) -> Any:
    """The lazy Dataset of written (and judged) rows for `items`."""
    import ray.data

    table = pa.Table.from_pylist(items, schema=pa.schema(ITEM_COLS))
    blocks = [table.slice(i, shard) for i in range(0, table.num_rows, shard)]
    ds = ray.data.from_arrow(blocks)
    keep = [f.name for f in ITEM_COLS]
    same = same_engine(d)
    if d.plan:
        ds = light_stage(ds, plan_requests, d=d)
        ds = apply_engine(ds, d.engine, keep)
    ds = light_stage(ds, write_requests, d=d, writer_runs_chat=same)
    ds = apply_engine(ds, d.engine, keep)
    ds = light_stage(ds, written)
    if not same and any(i["kind"] == "chat" for i in items):
        ds = light_stage(ds, chat_requests, d=d)
        ds = apply_engine(ds, d.chat.engine, [f.name for f in WRITTEN_COLS])
        ds = light_stage(ds, chat_answers)
    if d.judge.llm:
        ds = light_stage(ds, judge_requests)
        ds = apply_engine(ds, d.judge.engine, [f.name for f in WRITTEN_COLS])
        ds = light_stage(ds, judgements)
    return ds


def same_engine(d: DocsConfig) -> bool:
    """Whether the chat replies can come from the writer's engine (same model and settings)."""
    return d.chat.engine.model_dump() == d.engine.model_dump()


# ------------------------------------------------------------------ driver: filter and commit

SENTENCE_END = re.compile(r"[.!?][\"')\]]?(?=\s|$)")


def trim_to_sentence(text: str) -> str:
    """A document cut off by max_tokens, up to its last full sentence."""
    ends = list(SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].rstrip() if ends else text


def shingles(text: str, n: int = 5) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


class NearDuplicates:
    """Jaccard similarity of 5-word shingles against every kept document (an inverted index
    over shingles finds the candidates)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.sets: list[set[str]] = []
        self.index: dict[str, list[int]] = {}

    def add(self, text: str) -> None:
        s = shingles(text)
        for sh in s:
            self.index.setdefault(sh, []).append(len(self.sets))
        self.sets.append(s)

    def most_similar(self, text: str) -> float:
        s = shingles(text)
        shared: Counter = Counter()
        for sh in s:
            shared.update(self.index.get(sh, ()))
        best = 0.0
        for j, k in shared.items():
            union = len(s) + len(self.sets[j]) - k
            best = max(best, k / union if union else 0.0)
        return best


class Filter:
    """Turns written rows into kept documents / chat rows / quarantine rows, with counts."""

    def __init__(self, spec: Spec, d: DocsConfig, writer: str, chat_writer: str):
        self.spec, self.d = spec, d
        self.ids = spec.policy_ids()
        self.writer, self.chat_writer = writer, chat_writer
        self.dups = NearDuplicates(d.near_duplicate)

    def reject(self, r: dict[str, Any]) -> str | None:
        """Why a written document is dropped (None: kept). Order: engine, length, ids, judge,
        near duplicate."""
        d = self.d
        if r["writer_error"]:
            return "engine_error"
        words = len(r["text"].split())
        if words < d.min_words:
            return "too_short"
        if words > d.max_words:
            return "too_long"
        if d.judge.programmatic:
            cited = set(CITATION.findall(r["title"] + "\n" + r["text"]))
            if cited - self.ids:
                return "unknown_policy_id"
            if r["category"] is not None:
                own = self.spec.policy_ids(r["category"])
                if cited and not cited & own:
                    return "cites_other_category_only"
        if d.judge.llm:
            if r["judge_score"] is None:
                return "judge_unreadable"
            if r["judge_score"] < d.judge.threshold:
                return "judge_disagrees"
        if self.dups.most_similar(r["text"]) >= d.near_duplicate:
            return "near_duplicate"
        return None

    def finish(self, r: dict[str, Any], out: dict[str, list], stats: Counter) -> None:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        if r["kind"] == "chat":
            stats["chat_prompts"] += 1
            text = (r["text"] or "").strip()
            reason = (
                "engine_error"
                if r["writer_error"]
                else "truncated"
                if r["finish_reason"] == "length"
                else "empty"
                if not text
                else None
            )
            if reason:
                stats[f"chat_dropped:{reason}"] += 1
                raw = {"messages": r["prompt_messages"], "text": text, "error": r["writer_error"]}
                out["quarantine"].append(quarantine_row("docs_chat", reason, raw, r["id"]))
                return
            stats["chat_kept"] += 1
            reply = {"role": "assistant", "content": text}
            out["chat"].append(
                {
                    "id": r["id"],
                    "messages": [*r["prompt_messages"], reply],
                    "category": r["category"],
                    "writer": self.chat_writer,
                    "created_at": now,
                }
            )
            return
        stats["planned"] += 1
        stats[f"written_by_variant:{r['variant']}"] += 1
        stats["generated_tokens"] += r["generated_tokens"] or 0
        truncated = r["finish_reason"] == "length"
        if truncated:
            stats["truncated"] += 1
            r = r | {"text": trim_to_sentence(r["text"] or "")}
        r = r | {"text": (r["text"] or "").strip(), "title": r["title"] or ""}
        reason = self.reject(r)
        if reason:
            stats[f"rejected:{reason}"] += 1
            raw = {
                k: r.get(k)
                for k in (
                    "variant",
                    "topic",
                    "doc_type",
                    "title",
                    "text",
                    "judge_score",
                    "judge_note",
                    "writer_error",
                )
            }
            out["quarantine"].append(quarantine_row("docs", reason, raw, r["id"]))
            return
        self.dups.add(r["text"])
        stats["kept"] += 1
        stats[f"kept_by_variant:{r['variant']}"] += 1
        stats[f"kept_by_topic:{r['topic']}"] += 1
        stats[f"kept_by_type:{r['doc_type']}"] += 1
        out[documents_table(r["variant"])].append(
            {
                "id": r["id"],
                "variant": r["variant"],
                "topic": r["topic"],
                "category": r["category"],
                "doc_type": r["doc_type"],
                "title": r["title"],
                "text": r["text"],
                "words": len(r["text"].split()),
                "truncated": truncated,
                "judge_score": r.get("judge_score"),
                "spec_sha": self.spec.sha,
                "writer": self.writer,
                "created_at": now,
            }
        )


# ------------------------------------------------------------------ the stage


def output_dir(cfg: Config) -> str:
    """The stage's folder: a local path (absolute) or a URI (s3://bucket/run/docs)."""
    d = cfg.docs or DocsConfig()
    return storage.absolute(d.output_dir or storage.join(cfg.run_dir, "docs"))


def resume_key(cfg: Config, spec: Spec) -> str:
    """What a written row depends on: the spec, the writer/judge/chat models and every
    setting but engine throughput and the output folder."""
    d: DocsConfig = cfg.docs  # type: ignore[assignment]
    blob = d.model_dump(
        mode="json",
        exclude={
            "engine": True,
            "output_dir": True,
            "shard_docs": True,
            "judge": {"engine"},
            "chat": {"engine"},
        },
    ) | {
        "spec_sha": spec.sha,
        "writer": d.engine.label,
        "judge": d.judge.engine.label if d.judge.llm else None,
        "chat": d.chat.engine.label,
        "prompts": cfg.prompts.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def resolve(d: DocsConfig) -> DocsConfig:
    """Engines with `kind: auto` resolved once, so provenance names what ran."""
    judge = d.judge
    if judge.llm:
        judge = judge.model_copy(update={"engine": resolve_engine(judge.engine, "docs judge")})
    chat = d.chat.model_copy(update={"engine": resolve_engine(d.chat.engine, "docs chat")})
    return d.model_copy(
        update={"engine": resolve_engine(d.engine, "docs writer"), "judge": judge, "chat": chat}
    )


def run_docs(
    section: DocsConfig,
    run_dir: str,
    *,
    spec: SpecConfig,
    prompts: PromptsConfig,
    eval_suites: Sequence[str] = (),
    progress: bool = True,
    fresh: bool = False,
) -> DocsResult:
    """Run (or resume) the docs stage into `section.output_dir` (null: {run_dir}/docs) on the
    run's spec (and, for chat rows, its prompt pool; `eval_suites` are refused there)."""
    from deliberate_ray.runlock import RunLock

    cfg = Config(run_dir=run_dir, spec=spec, prompts=prompts, docs=resolve(section))
    d: DocsConfig = cfg.docs  # type: ignore[assignment]
    loaded = load_spec(spec.path)
    root = output_dir(cfg)
    items = plan_documents(loaded, d) + chat_items(cfg, loaded, eval_suites)
    tables = {documents_table(v): DOC for v in d.variants} | {
        "chat": CHAT,
        "quarantine": QUARANTINE,
    }
    with RunLock(root, "docs"):
        store = ShardStore(root, resume_key(cfg, loaded), fresh=fresh, tables=tables)
        return _run(cfg, loaded, root, store, items, progress)


def _run(
    cfg: Config, spec: Spec, root: str, store: ShardStore, items: list[dict], progress: bool
) -> DocsResult:
    from tqdm import tqdm

    d: DocsConfig = cfg.docs  # type: ignore[assignment]
    started = time.time()
    done = store.done_ids
    todo = [i for i in items if i["id"] not in done]
    log.info(
        "docs: %d items (documents and chat rows), %d done, %d to do",
        len(items),
        len(items) - len(todo),
        len(todo),
    )
    chat_writer = (d.engine if same_engine(d) else d.chat.engine).label
    filt = Filter(spec, d, d.engine.label, chat_writer)
    for v in d.variants:  # resume: earlier kept documents count for near duplicates
        for f in storage.glob(storage.join(root, documents_table(v)), "part-*.parquet"):
            for text in storage.read_table(f, columns=["text"]).column("text").to_pylist():
                filt.dups.add(text)
    run: Counter = Counter()
    if todo:
        names = [*(documents_table(v) for v in d.variants), "chat", "quarantine"]
        out: dict[str, list] = {n: [] for n in names}
        buffer: list[str] = []
        shard_stats: Counter = Counter()
        bar = tqdm(total=len(todo), desc="docs: rows done", unit="row", disable=not progress)
        for batch in build_dataset(todo, d, d.shard_docs).iter_batches(
            batch_size=None, batch_format="pyarrow"
        ):
            for r in batch.to_pylist():
                filt.finish(r, out, shard_stats)
                buffer.append(r["id"])
                bar.update(1)
                if len(buffer) >= d.shard_docs:
                    store.commit(buffer, out, nested(shard_stats))
                    run.update(shard_stats)
                    buffer, out, shard_stats = [], {n: [] for n in names}, Counter()
        if buffer:
            store.commit(buffer, out, nested(shard_stats))
            run.update(shard_stats)
        bar.close()
        missing = {i["id"] for i in todo} - set(store.done_ids)
        if missing:  # rows lost on the way would be silent data loss: say so
            raise RuntimeError(f"docs: {len(missing)} items came back without a row")
    total = store.totals()
    stats = {"total": total, "this_run": nested(run) | {"wall_s": round(time.time() - started, 2)}}
    storage.write_text(
        storage.join(root, "stats.json"), json.dumps(stats, indent=2, sort_keys=True)
    )
    write_card(root, cfg, spec, total)
    return DocsResult(
        output_dir=root,
        documents={v: store.path(documents_table(v)) for v in d.variants},
        chat=store.path("chat"),
        quarantine=store.path("quarantine"),
        stats=stats,
        writer=d.engine.label,
        resume_key=store.key,
    )


def nested(flat: Counter) -> dict[str, Any]:
    from deliberate_ray.generate.run import split_stats

    return split_stats(flat)


# ------------------------------------------------------------------ card


def write_card(root: str, cfg: Config, spec: Spec, total: dict[str, Any]) -> None:
    """README.md of the corpus: provenance, counts per policy x variant and per type, and
    every rejection reason."""
    d: DocsConfig = cfg.docs  # type: ignore[assignment]
    kept_topic = total.get("kept_by_topic", {})
    kept_type = total.get("kept_by_type", {})
    written = total.get("written_by_variant", {})
    kept_var = total.get("kept_by_variant", {})
    lines = [
        "# deliberate-ray spec-document corpus (Model Spec Midtraining)",
        "",
        "Synthetic documents that discuss the behaviour spec (what it says and, for the "
        "`values` variant, why), written by `deliberate-ray docs`; plus chat rows (the "
        "student's own replies to benign prompts) that the midtraining mixes in.",
        "",
        f"- spec: `{cfg.spec.path}` (spec_sha `{spec.sha}`)",
        f"- writer: `{d.engine.label}`; sampling: temperature {d.sampling.temperature}, "
        f"max_tokens {d.sampling.max_tokens}; titles planned in a pass of their own: {d.plan}",
        f"- judge: programmatic {d.judge.programmatic}; LLM "
        + (f"`{d.judge.engine.label}` (threshold {d.judge.threshold})" if d.judge.llm else "off"),
        f"- filters: {d.min_words}-{d.max_words} words; near duplicates at Jaccard >= "
        f"{d.near_duplicate} (5-word shingles)",
        f"- documents written: {total.get('planned', 0)}, kept: {total.get('kept', 0)}, "
        f"cut off by max_tokens (trimmed to the last sentence): {total.get('truncated', 0)}",
        f"- chat rows: {total.get('chat_kept', 0)} of {total.get('chat_prompts', 0)} prompts",
        "",
        "## Kept documents per variant",
        "",
        "| variant | written | kept |",
        "|---|---|---|",
        *(f"| {v} | {written.get(v, 0)} | {kept_var.get(v, 0)} |" for v in d.variants),
        "",
        "## Kept documents per topic (policy id; `spec`: the spec as a whole)",
        "",
        "| topic | kept |",
        "|---|---|",
        *(f"| {t} | {n} |" for t, n in sorted(kept_topic.items())),
        "",
        "## Kept documents per type",
        "",
        "| type | kept |",
        "|---|---|",
        *(f"| {t} | {n} |" for t, n in sorted(kept_type.items())),
        "",
        "## Rejection reasons",
        "",
        *(
            [f"- `{r}`: {n}" for r, n in sorted(total.get("rejected", {}).items())]
            + [f"- chat `{r}`: {n}" for r, n in sorted(total.get("chat_dropped", {}).items())]
            or ["- none"]
        ),
        "",
        "## Files",
        "",
        *(
            f"- `{documents_table(v)}/`: documents of the `{v}` variant (`text`, `title`, "
            "`topic`, `doc_type`, `judge_score`, provenance)"
            for v in d.variants
        ),
        "- `chat/`: `messages` (prompt, then the reply the midtraining trains on)",
        "- `quarantine/`: every dropped row and why; `stats.json`: the counts",
        "",
    ]
    _atomic_write(storage.join(root, "README.md"), "\n".join(lines).encode())


def summary(result: DocsResult) -> str:
    total = result.stats["total"]
    lines = [
        f"docs: {total.get('kept', 0)} of {total.get('planned', 0)} documents kept; "
        f"{total.get('chat_kept', 0)} chat rows; "
        f"this run {result.stats['this_run']['wall_s']:.0f} s",
    ]
    for reason, n in sorted(total.get("rejected", {}).items()):
        lines.append(f"  rejected {reason}: {n}")
    lines.append(f"  output: {result.output_dir} (card: README.md)")
    return "\n".join(lines)
