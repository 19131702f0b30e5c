"""Teacher prompts (spec in context) and parsing of what the teacher wrote.

Two reply formats: `delimiter` for plain instruct models ("Reasoning: ... Answer: ...",
optionally with the assistant turn prefilled with the opener) and `think` for reasoning
models that emit `<think>...</think>` themselves (e.g. Qwen3 with thinking on).
"""

from __future__ import annotations

from dataclasses import dataclass

from deliberate_ray.config import TeacherConfig
from deliberate_ray.spec import Example, Spec, Variant

COT_OPENER = "Reasoning:"
ANSWER_MARK = "Answer:"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Small instruct models keep going by inventing the next turn or section; stop there.
# Model-specific stops (e.g. a blank line for a 135M model) go in teacher.sampling.stop.
DELIMITER_STOPS = ["\nUser:", "\nReasoning:", "\n## "]

DELIMITER_INSTRUCTIONS = (
    "## How to reply\n"
    f'Start with "{COT_OPENER}" and think it through: name the policy ids above that apply '
    "to the request (cite only those) and decide whether to comply, refuse or safe-complete. "
    f'Then write "{ANSWER_MARK}" and reply to the user in the matching style.'
)
THINK_INSTRUCTIONS = (
    "## How to reply\n"
    "Think first: name the policy ids above that apply to the request (cite only those) and "
    "decide whether to comply, refuse or safe-complete. Then reply to the user in the "
    "matching style."
)


def pick_examples(spec: Spec, category: str, k: int) -> list[Example]:
    """Up to k worked examples of the category, alternating refusals and helpful answers."""
    examples = [e for _, e in spec.examples(category)]
    refusals = [e for e in examples if e.action == "refuse"]
    helpful = [e for e in examples if e.action != "refuse"]
    mixed = [e for pair in zip(refusals, helpful, strict=False) for e in pair]
    rest = [e for e in examples if e not in mixed]
    return (mixed + rest)[:k]


def delimiter_reply(e: Example) -> str:
    return f"{COT_OPENER} {e.reasoning}\n{ANSWER_MARK} {e.answer}"


def system_prompt(spec: Spec, category: str, variant: Variant, cfg: TeacherConfig) -> str:
    """spec_for(category) + how to reply (+ worked examples as text for `think`)."""
    parts = [spec.render(category, variant).strip()]
    if cfg.reasoning_format == "think":
        parts.append(THINK_INSTRUCTIONS)
        examples = pick_examples(spec, category, cfg.num_examples)
        if examples:
            shown = [
                f"User: {e.prompt}\n{THINK_OPEN}{e.reasoning}{THINK_CLOSE}\n{e.answer}"
                for e in examples
            ]
            parts.append("## Worked examples\n" + "\n\n".join(shown))
    else:
        parts.append(DELIMITER_INSTRUCTIONS)
    return "\n\n".join(parts) + "\n"


def teacher_messages(
    prompt_messages: list[dict[str, str]],
    spec: Spec,
    category: str,
    variant: Variant,
    cfg: TeacherConfig,
) -> list[dict[str, str]]:
    """The whole teacher context; everything except `prompt_messages` is stripped later.

    The prompt's own system message is appended to the spec system prompt. For `delimiter`,
    worked examples are earlier chat turns (a small model copies the format of a turn far
    better than of quoted text) and the assistant turn is prefilled with the CoT opener.
    Reasoning-model chat templates drop the thinking of earlier turns, so for `think` the
    examples stay in the system prompt.
    """
    own_system = [m["content"] for m in prompt_messages if m["role"] == "system"]
    rest = [m for m in prompt_messages if m["role"] != "system"]
    system = system_prompt(spec, category, variant, cfg)
    messages = [{"role": "system", "content": "\n".join([system, *own_system])}]
    if cfg.reasoning_format == "delimiter":
        for e in pick_examples(spec, category, cfg.num_examples):
            messages.append({"role": "user", "content": e.prompt})
            messages.append({"role": "assistant", "content": delimiter_reply(e)})
    messages += rest
    if prefill(cfg):
        messages.append({"role": "assistant", "content": COT_OPENER})
    return messages


# The reasoning line around the policy id, in characters. The bound keeps a small model from
# rambling on until max_tokens before it names a policy; the answer line has none (xgrammar's
# token masks for a long bounded repetition cost more per step than the model itself on CPU:
# bench/teacher_regex.py).
REASONING_CHARS = 100


def reply_regex(spec: Spec, category: str, cfg: TeacherConfig) -> str:
    """The continuation of the prefilled "Reasoning:" that `constrain` decodes under: a
    reasoning line that names one of the category's policy ids as a word of its own (after
    a space or "(", not followed by a digit: "allVIO-2" or "VIO-21" would not read as a
    citation), then one answer line (a newline ends it: the model stops where it would have
    started a new paragraph)."""
    ids = "|".join(sorted(spec.policy_ids(category)))  # letters, "-", digits (spec.py checks)
    before = f"([^\\n]{{0,{REASONING_CHARS - 1}}}[ (])?"
    after = f"([^0-9\\n][^\\n]{{0,{REASONING_CHARS - 1}}})?"
    return f" {before}({ids}){after}\\n{ANSWER_MARK} [^\\n]+\\n?"


def prefill(cfg: TeacherConfig) -> bool:
    return cfg.reasoning_format == "delimiter" and cfg.prefill


def stop_strings(cfg: TeacherConfig) -> list[str]:
    return DELIMITER_STOPS if cfg.reasoning_format == "delimiter" else []


@dataclass(frozen=True)
class Parsed:
    raw_text: str  # what the model wrote, including a prefilled opener
    cot: str | None
    answer: str | None
    malformed: str | None  # quarantine reason, or None


def parse(
    generated: str, finish_reason: str, engine_error: str | None, cfg: TeacherConfig
) -> Parsed:
    """Split a sample into CoT and answer; say why when it cannot be used."""
    raw = (COT_OPENER if prefill(cfg) else "") + (generated or "")
    if engine_error:
        return Parsed(raw, None, None, "engine_error")
    if cfg.reasoning_format == "think":
        cot, answer = _split(raw, THINK_CLOSE)
        if answer is None and THINK_OPEN not in raw:
            cot = None  # never started thinking
        cot = cot.replace(THINK_OPEN, "", 1).strip() if cot is not None else None
    else:
        cot, answer = _split(raw, ANSWER_MARK)
        cot = cot.replace(COT_OPENER, "", 1).strip() if cot is not None else None
    if finish_reason == "length":
        reason = "truncated"
    elif not cot:
        reason = "no_cot"
    elif not answer:
        reason = "no_answer"
    elif degenerate(cot + "\n" + answer):
        reason = "degenerate_repetition"
    else:
        reason = None
    return Parsed(raw, cot or None, answer or None, reason)


def _split(text: str, mark: str) -> tuple[str | None, str | None]:
    head, sep, tail = text.partition(mark)
    if not sep:
        return head, None
    return head, tail.strip()


def degenerate(text: str, n: int = 4) -> bool:
    """Looping text: few distinct word n-grams, or one line repeated three or more times."""
    words = text.split()
    if len(words) >= 24:
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        if len(set(grams)) / len(grams) < 0.5:
            return True
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 8]
    return any(lines.count(ln) >= 3 for ln in set(lines))
