"""Training rows: tuples or documents -> token ids and labels -> fixed-length (packed) rows.

The encoding goes through the model's own chat template, and the prompt and the reply are
tokenized apart, exactly as the model sees them at inference (the prompt rendered with the
generation prompt, then the tokens it writes). Labels are -100 everywhere but on the reply.

A packed row holds several examples; each one's position ids restart at 0, which is how
transformers (sdpa/eager: a block-diagonal mask; flash-attention: cu_seqlens) keeps
attention inside each example. The first token of every example has label -100, so the
last token of one example is never trained to predict the first of the next.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from deliberate_ray.config import TrainConfig

log = logging.getLogger(__name__)

IGNORE = -100
# The student's reasoning format when the chat template has no reasoning field of its own.
THINK_OPEN = "<think>\n"
THINK_FORMAT = THINK_OPEN + "{cot}\n</think>\n\n{answer}"
REQUIRED_COLUMNS = {
    "cot": ("messages", "cot", "answer"),
    "no_cot": ("messages", "answer"),
    "docs": ("text",),
    "chat": ("messages",),  # the general instruction data mixed in: last turn is the reply
}
ENCODED = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("num_tokens", pa.int32()),
        ("drop", pa.string()),
    ]
)
PACK_WINDOW = 1024  # examples packed together; a larger window wastes less at its edges


class TrainDataError(ValueError):
    """Training data cannot be used as given; the message names the file and what is wrong."""


@lru_cache(maxsize=8)
def tokenizer_for(model: str, variant: str | None = None) -> Any:
    """The model's tokenizer; for `cot` on a template without a reasoning field of its own,
    with the think block opened by the template (`think_template`)."""
    from deliberate_ray.models import load_tokenizer

    tok = load_tokenizer(model)
    tok.chat_template = student_template(tok.chat_template, variant)
    return tok


def student_template(chat_template: str | None, variant: str | None) -> str | None:
    """The chat template a student of `variant` trains and ships with: `think_template` for
    `cot` on a template without a reasoning field of its own, else the base model's."""
    if variant == "cot" and opens_think(chat_template or ""):
        return think_template(chat_template or "")
    return chat_template


# Marks a template that think_template wrapped (so it is never wrapped twice).
THINK_WRAPPED = "deliberate-ray: the generation prompt opens the think block"


def opens_think(chat_template: str) -> bool:
    """Whether a `cot` student on this template gets its think block opened by the template:
    templates without a reasoning field of their own (plain instruct models)."""
    return bool(chat_template) and "reasoning_content" not in chat_template


def think_template(chat_template: str) -> str:
    """The chat template of a `cot` student: the base model's, with `<think>` and a newline
    after the generation prompt, as DeepSeek-R1's template does. The student starts its
    reasoning at once instead of having to learn to spell the opener: the embedded 135M
    student, whose tokenizer splits `<think>` into "<", "think", ">", learned the "<" in 32
    LoRA steps and then made up tags ("<tap>", "<smile>") in 88 of 96 replies. Training
    masks the opener as part of the prompt; the export ships this template, so vLLM (its
    olmo3 reasoning parser allows the opener in the prompt), the transformers app and the
    eval all build the same prompt."""
    if THINK_WRAPPED in chat_template:
        return chat_template
    return (
        "{#- " + THINK_WRAPPED + " -#}"
        "{% set base_turns %}" + chat_template + "{% endset %}{{ base_turns }}"
        "{% if add_generation_prompt %}{{ " + repr(THINK_OPEN) + " }}{% endif %}"
    )


def assistant_turn(row: dict[str, Any], variant: str, chat_template: str) -> dict[str, Any]:
    """The reply to train on: CoT then answer (`cot`), or the answer alone (`no_cot`)."""
    if variant == "no_cot":
        return {"role": "assistant", "content": row["answer"]}
    if "reasoning_content" in chat_template:  # the template renders its own reasoning field
        return {"role": "assistant", "content": row["answer"], "reasoning_content": row["cot"]}
    content = THINK_FORMAT.format(cot=row["cot"], answer=row["answer"])
    return {"role": "assistant", "content": content}


def split_chat(row: dict[str, Any], variant: str, chat_template: str) -> tuple[list, dict] | str:
    """(prompt messages, reply) for one row, or the reason the row cannot be used."""
    messages = [{"role": m["role"], "content": m["content"]} for m in row.get("messages") or []]
    if variant == "chat":
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            return "no_final_assistant_turn"
        return messages[:-1], messages[-1]
    if not messages or messages[-1]["role"] != "user":
        return "prompt_not_ending_in_user_turn"
    if not (row.get("answer") or "").strip():
        return "empty_answer"
    if variant == "cot" and not (row.get("cot") or "").strip():
        return "empty_cot"
    return messages, assistant_turn(row, variant, chat_template)


def encode_chat(tok: Any, prompt: list[dict], reply: dict) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation; labels only on the reply and its end token."""
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(prompt + [reply], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise TrainDataError(
            "the chat template renders the prompt differently with and without the reply, so "
            "the reply cannot be cut out for completion-only loss; use a model whose template "
            "keeps the prompt as a prefix"
        )
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    reply_ids = tok(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    # What the template adds after the end-of-turn token (a newline) is not the model's to write.
    if tok.eos_token_id in reply_ids:
        reply_ids = reply_ids[: len(reply_ids) - reply_ids[::-1].index(tok.eos_token_id)]
    return prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids


def encode_doc(tok: Any, text: str, max_len: int) -> list[tuple[list[int], list[int]]]:
    """A document as chunks of at most `max_len` tokens, loss on every predictable token."""
    ids = tok(text, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    chunks = [ids[i : i + max_len] for i in range(0, len(ids), max_len)]
    return [(c, [IGNORE] + c[1:]) for c in chunks if len(c) > 1]


def encode_batch(batch: pa.Table, model: str, variant: str, max_len: int) -> pa.Table:
    """Ray Data map: rows -> examples; `drop` says why a row is unusable ("" if it is not)."""
    tok = tokenizer_for(model, variant)
    out: dict[str, list] = {"input_ids": [], "labels": [], "num_tokens": [], "drop": []}

    def emit(ids: list[int], labels: list[int], drop: str = "") -> None:
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["num_tokens"].append(len(ids))
        out["drop"].append(drop)

    for row in batch.to_pylist():
        if variant == "docs":
            if not (row.get("text") or "").strip():
                emit([], [], "empty_text")
            for ids, labels in encode_doc(tok, row["text"] or "", max_len):
                emit(ids, labels)
            continue
        parts = split_chat(row, variant, tok.chat_template or "")
        if isinstance(parts, str):
            emit([], [], parts)
            continue
        ids, labels = encode_chat(tok, *parts)
        if len(ids) > max_len:
            emit([], [], "too_long")
        else:
            emit(ids, labels)
    return pa.table(out, schema=ENCODED)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each bin's lengths summing to at most `capacity`."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_examples(
    input_ids: list[Any], labels: list[Any], max_len: int, pad_id: int, packing: bool, seed: int
) -> dict[str, np.ndarray]:
    """Examples -> rows of `max_len` (input_ids, labels, position_ids, num_tokens).

    Position ids restart at 0 for each example; padding continues the last example's
    positions (it sits after every real token, so the causal mask hides it) and has label -100.
    """
    lengths = [len(x) for x in input_ids]
    bins = first_fit_decreasing(lengths, max_len) if packing else [[i] for i in range(len(lengths))]
    bins = [bins[i] for i in np.random.default_rng(seed).permutation(len(bins))]
    n = len(bins)
    out = {
        "input_ids": np.full((n, max_len), pad_id, dtype=np.int64),
        "labels": np.full((n, max_len), IGNORE, dtype=np.int64),
        "position_ids": np.zeros((n, max_len), dtype=np.int64),
        "num_tokens": np.zeros(n, dtype=np.int64),
    }
    for r, members in enumerate(bins):
        pos = 0
        for i in members:
            k = lengths[i]
            out["input_ids"][r, pos : pos + k] = input_ids[i]
            out["labels"][r, pos : pos + k] = labels[i]
            out["position_ids"][r, pos : pos + k] = np.arange(k)
            pos += k
        out["position_ids"][r, pos:] = np.arange(k, k + max_len - pos)
        out["num_tokens"][r] = pos
    return out


def pack_batch(
    batch: dict[str, np.ndarray], max_len: int, pad_id: int, packing: bool, seed: int
) -> dict[str, np.ndarray]:
    """Ray Data map over a window of encoded examples."""
    return pack_examples(
        list(batch["input_ids"]), list(batch["labels"]), max_len, pad_id, packing, seed
    )


# ---------------------------------------------------------------- datasets


@dataclass
class DataStats:
    """What became of the input: examples kept, rows dropped (by reason), rows after packing."""

    examples: int = 0
    mixed_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    tokens: int = 0

    def summary(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"{self.examples} examples ({self.mixed_in} mixed in), dropped: {drops}; "
            f"{self.rows} rows, {self.tokens} tokens"
        )


def read_rows(path: str, variant: str, field_name: str) -> Any:
    """One file (or folder of Parquet) -> Ray Dataset, after checking the columns it needs."""
    import ray.data

    is_remote = "://" in path
    if not is_remote and not Path(path).exists():
        raise TrainDataError(f"{field_name}: bad value {path!r} -> file not found")
    if path.endswith((".jsonl", ".json")):
        ds = ray.data.read_json(path)
    elif path.endswith(".parquet") or is_remote or Path(path).is_dir():  # remote: a folder
        ds = ray.data.read_parquet(path)
    else:
        raise TrainDataError(
            f"{field_name}: bad value {path!r} -> allowed: .parquet (file or folder), .jsonl, .json"
        )
    columns = ds.schema().names
    missing = [c for c in REQUIRED_COLUMNS[variant] if c not in columns]
    if missing:
        raise TrainDataError(
            f"{field_name}: {path!r} lacks column(s) {missing} that variant {variant!r} needs; "
            f"it has {columns}"
        )
    return ds.select_columns(list(REQUIRED_COLUMNS[variant]))


def encode(paths: list[str], variant: str, cfg: TrainConfig, field_name: str) -> Any:
    """Files -> materialized Dataset of encoded examples, unusable rows marked in `drop`."""
    parts = [read_rows(p, variant, f"{field_name}[{i}]") for i, p in enumerate(paths)]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(
        encode_batch,
        fn_kwargs={"model": cfg.model, "variant": variant, "max_len": cfg.max_seq_len},
        batch_format="pyarrow",
        batch_size=256,
    ).materialize()


def tally(ds: Any) -> tuple[int, int, Counter]:
    """(usable examples, their tokens, dropped rows by reason) of an encoded dataset."""
    df = ds.select_columns(["num_tokens", "drop"]).to_pandas()
    kept = df["drop"] == ""
    return int(kept.sum()), int(df["num_tokens"][kept].sum()), Counter(df["drop"][~kept])


def build_dataset(cfg: TrainConfig, data: list[str]) -> tuple[Any, DataStats]:
    """Read, encode, optionally mix, shuffle and pack: the Ray Dataset the workers train on."""
    from ray.data.expressions import col

    if not data:
        raise TrainDataError(
            "train.data: empty -> list the tuple (or, for variant 'docs', document) files"
        )
    stats = DataStats()
    ds = encode(data, cfg.variant, cfg, "train.data")
    stats.examples, stats.tokens, dropped = tally(ds)
    stats.dropped.update(dropped)
    ds = ds.filter(expr=col("drop") == "")
    if stats.examples == 0:
        raise TrainDataError(f"train.data: no usable rows in {data} (dropped: {stats.dropped})")
    if cfg.mix_data:
        mix = encode([cfg.mix_data], "chat", cfg, "train.mix_data")
        stats.dropped.update({f"mix_{k}": v for k, v in tally(mix)[2].items()})
        mix = mix.filter(expr=col("drop") == "")
        wanted = round(stats.examples * cfg.mix_ratio / (1 - cfg.mix_ratio))
        mix = mix.random_shuffle(seed=cfg.seed).limit(wanted).materialize()
        stats.mixed_in = mix.count()
        stats.tokens += tally(mix)[1]
        if stats.mixed_in < wanted:
            log.warning(
                "train.mix_data has %d usable rows, fewer than the %d that mix_ratio %.2f asks",
                stats.mixed_in,
                wanted,
                cfg.mix_ratio,
            )
        ds = ds.union(mix)
    pad_id = tokenizer_for(cfg.model).pad_token_id
    packed = (
        ds.select_columns(["input_ids", "labels"])
        .random_shuffle(seed=cfg.seed)
        .map_batches(
            pack_batch,
            fn_kwargs={
                "max_len": cfg.max_seq_len,
                "pad_id": pad_id,
                "packing": cfg.packing,
                "seed": cfg.seed,
            },
            batch_format="numpy",
            batch_size=PACK_WINDOW,
        )
        .materialize()
    )
    stats.rows = packed.count()
    log.info("train data: %s", stats.summary())
    return packed, stats
