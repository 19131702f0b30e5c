"""Training data without Ray: labels through the chat template, documents, packing (the same
per-example loss packed and unpacked), and config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deliberate_ray.config import Config, ConfigError, parse_model
from deliberate_ray.train.data import (
    IGNORE,
    assistant_turn,
    encode_batch,
    encode_chat,
    encode_doc,
    first_fit_decreasing,
    opens_think,
    pack_examples,
    split_chat,
    tokenizer_for,
)

PROMPT = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "How do I kill a frozen process on Linux?"},
]
ROW = {
    "messages": PROMPT,
    "cot": "PRV-1 does not apply; killing a process is benign (comply).",
    "answer": "Find its PID with `ps` and run `kill -9 PID`.",
}


@pytest.fixture(scope="module")
def tok(tiny_model: str):
    return tokenizer_for(tiny_model)


@pytest.mark.parametrize(
    "variant, reply",
    [
        # The cot student's template opens the think block: the opener is prompt, not reply.
        ("cot", f"{ROW['cot']}\n</think>\n\n{ROW['answer']}"),
        ("no_cot", ROW["answer"]),
    ],
)
def test_labels_mask_exactly_the_prompt(tiny_model, variant: str, reply: str) -> None:
    tok = tokenizer_for(tiny_model, variant)
    prompt, turn = split_chat(ROW, variant, tok.chat_template)
    ids, labels = encode_chat(tok, prompt, turn)
    # The prompt as the model sees it at inference: the template with the generation prompt.
    prompt_ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
    n = len(prompt_ids)
    assert ids[:n] == list(prompt_ids)
    assert tok.decode(prompt_ids).endswith("<think>\n") == (variant == "cot")
    for i, (token, label) in enumerate(zip(ids, labels, strict=True)):
        assert label == (IGNORE if i < n else token), f"position {i}: {tok.decode([token])!r}"
    assert tok.decode(ids[n:]) == reply + tok.eos_token
    assert ids[-1] == tok.eos_token_id


def test_think_template_opens_the_block_once_and_only_for_the_reply(tok) -> None:
    from deliberate_ray.train.data import think_template

    wrapped = think_template(tok.chat_template)
    assert think_template(wrapped) == wrapped
    conversation = [*PROMPT, {"role": "assistant", "content": "Hi."}]
    plain = tok.apply_chat_template(conversation, tokenize=False, chat_template=wrapped)
    assert plain == tok.apply_chat_template(conversation, tokenize=False)  # no reply opener
    asked = tok.apply_chat_template(
        PROMPT, tokenize=False, add_generation_prompt=True, chat_template=wrapped
    )
    base = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert asked == base + "<think>\n"
    # Templates with their own reasoning field are left alone.
    assert not opens_think("{{ message.reasoning_content }}")


def test_reasoning_field_used_when_the_template_has_one() -> None:
    turn = assistant_turn(ROW, "cot", "{{ message.reasoning_content }}")
    assert turn == {"role": "assistant", "content": ROW["answer"], "reasoning_content": ROW["cot"]}
    assert "<think>" in assistant_turn(ROW, "cot", "{{ message.content }}")["content"]


@pytest.mark.parametrize(
    "row, variant, reason",
    [
        ({**ROW, "cot": "  "}, "cot", "empty_cot"),
        ({**ROW, "cot": None}, "no_cot", None),
        ({**ROW, "answer": ""}, "no_cot", "empty_answer"),
        ({**ROW, "messages": [*PROMPT, {"role": "assistant", "content": "x"}]}, "cot", "prompt_"),
        ({"messages": PROMPT}, "chat", "no_final_assistant_turn"),
    ],
)
def test_unusable_rows_say_why(tok, row: dict, variant: str, reason: str | None) -> None:
    out = split_chat(row, variant, tok.chat_template)
    if reason is None:
        assert not isinstance(out, str)
    else:
        assert isinstance(out, str) and out.startswith(reason)


def test_encode_batch_marks_drops_and_chat_rows(tiny_model: str) -> None:
    import pyarrow as pa

    mix_row = {"messages": [*PROMPT, {"role": "assistant", "content": "Use kill."}]}
    table = encode_batch(pa.Table.from_pylist([mix_row]), tiny_model, "chat", max_len=512)
    assert table.column("drop").to_pylist() == [""]
    ids, labels = table.column("input_ids")[0].as_py(), table.column("labels")[0].as_py()
    tok = tokenizer_for(tiny_model)
    assert tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]) == (
        "Use kill." + tok.eos_token
    )
    long_row = {**ROW, "answer": "word " * 400}
    table = encode_batch(pa.Table.from_pylist([ROW, long_row]), tiny_model, "cot", max_len=128)
    assert table.column("drop").to_pylist() == ["", "too_long"]


def test_documents_are_chunked_with_loss_on_every_predictable_token(tok) -> None:
    text = "Policy VIO-2 exists because specific instructions enable harm. " * 20
    chunks = encode_doc(tok, text, max_len=64)
    assert len(chunks) > 2 and all(len(ids) <= 64 for ids, _ in chunks)
    assert sum((ids for ids, _ in chunks), []) == tok(text)["input_ids"] + [tok.eos_token_id]
    for ids, labels in chunks:
        assert labels == [IGNORE] + ids[1:]


def test_first_fit_decreasing_places_every_example_once() -> None:
    lengths = [50, 20, 90, 10, 60, 30, 100, 5]
    bins = first_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) == 4  # 375 tokens need at least 4 rows of 100


def _examples(tok) -> list[tuple[list[int], list[int]]]:
    rows = [{**ROW, "answer": ROW["answer"] * k} for k in (1, 3, 6, 2)]
    return [encode_chat(tok, *split_chat(r, "cot", tok.chat_template)) for r in rows]


def test_packing_restarts_positions_and_keeps_every_token(tok) -> None:
    examples = _examples(tok)
    lengths = [len(ids) for ids, _ in examples]
    packed = pack_examples(
        [e[0] for e in examples], [e[1] for e in examples], 400, tok.pad_token_id, True, seed=0
    )
    assert packed["num_tokens"].sum() == sum(lengths)
    assert len(packed["num_tokens"]) < len(examples)
    for r in range(len(packed["num_tokens"])):
        n = packed["num_tokens"][r]
        starts = [i for i in range(n) if packed["position_ids"][r, i] == 0]
        assert all(packed["labels"][r, s] == IGNORE for s in starts)
        assert (packed["labels"][r, n:] == IGNORE).all()
        assert (packed["input_ids"][r, n:] == tok.pad_token_id).all()
    unpacked = pack_examples(
        [e[0] for e in examples], [e[1] for e in examples], 400, tok.pad_token_id, False, seed=0
    )
    assert sorted(unpacked["num_tokens"]) == sorted(lengths)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_gives_the_same_per_example_loss(tiny_model: str, tok, attn: str) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).eval()
    examples = _examples(tok)

    def token_losses(ids, pos, labels) -> torch.Tensor:
        ids, pos, labels = (torch.as_tensor(x).reshape(1, -1) for x in (ids, pos, labels))
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
        return F.cross_entropy(logits[0], targets[0], ignore_index=IGNORE, reduction="none")

    alone = [token_losses(ids, range(len(ids)), labels).sum() for ids, labels in examples]
    packed = pack_examples(
        [e[0] for e in examples], [e[1] for e in examples], 1024, tok.pad_token_id, True, seed=0
    )
    assert len(packed["num_tokens"]) == 1
    losses = token_losses(packed["input_ids"][0], packed["position_ids"][0], packed["labels"][0])
    starts = [i for i, p in enumerate(packed["position_ids"][0]) if p == 0]
    ends = starts[1:] + [int(packed["num_tokens"][0])]
    in_row = sorted(float(losses[s:e].sum()) for s, e in zip(starts, ends, strict=True))
    assert in_row == pytest.approx(sorted(float(x) for x in alone), rel=1e-5)


@pytest.mark.parametrize(
    "train, expect",
    [
        ({"mix_data": "general.jsonl"}, "mix_data"),
        ({"variant": "sft"}, "train.variant: bad value 'sft'"),
        ({"name": "a/b"}, "train.name: bad value 'a/b'"),
        ({"lora": {"rank": 0}}, "train.lora.rank"),
    ],
)
def test_bad_train_config_names_the_field(train: dict, expect: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_model({"train": train}, Config, "run.yaml")
    assert expect in str(e.value)


def test_train_command_reports_a_missing_section_without_a_trace(tmp_path) -> None:
    from typer.testing import CliRunner

    from deliberate_ray.cli import app

    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/x\n")
    result = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 2
    assert "train: missing section" in result.output and "Traceback" not in result.output
