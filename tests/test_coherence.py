"""The coherence grader against hand labels of the embedded model's own replies
(data/graders/coherence_labels.jsonl; how they were collected and the label rules are in
data/graders/README.md), plus its rules on edge cases."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from deliberate_ray.graders.coherence import degenerate, helpful, on_topic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from coherence_grader import scores  # noqa: E402  (the bench's own measure, pinned here)

LABELS = Path(__file__).resolve().parents[1] / "data" / "graders" / "coherence_labels.jsonl"


def labelled() -> list[dict]:
    return [json.loads(x) for x in LABELS.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.mark.parametrize(
    ("split", "min_agree", "min_caught", "max_false_alarm"),
    # Measured with bench/coherence_grader.py (data/graders/README.md): dev 0.936 / 0.861 /
    # 0.021, held-out 0.915 / 0.808 / 0.013. The held-out rows were labelled after the rules
    # were fixed and never tuned on.
    [("dev", 0.92, 0.85, 0.03), ("heldout", 0.9, 0.78, 0.03)],
)
def test_agrees_with_hand_labels_on_real_replies(split, min_agree, min_caught, max_false_alarm):
    rows = [r for r in labelled() if r["split"] == split]
    assert len(rows) >= 100 and all(r["source"] for r in rows)
    counts = Counter(r["label"] for r in rows)
    assert counts["degenerate"] >= 40 and counts["coherent"] >= 70  # both kinds are there
    got = scores(rows)
    agree, caught, false_alarm = (
        got["agreement"],
        got["degenerate_caught"],
        got["coherent_flagged"],
    )
    assert agree >= min_agree, agree
    assert caught >= min_caught, caught
    assert false_alarm <= max_false_alarm, false_alarm


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("", "empty"),
        ("  ...  ", "empty"),
        ("<tap> <tap> <tap> <tap> hello <tap>", "tag_spam"),
        ("<tap> " * 8, "repetition"),
        ("Sure <b> here </b> <i> it </i> is <br> ok", "tag_spam"),
        ("Это очень хороший вопрос, и я отвечу на него подробно.", "wrong_script"),
        ("I can help. " + "You should send me another one. " * 4, "repetition"),
        ("Use a light fertilizer.\n" * 3, "repetition"),
        ("Paris is the capital of France.", None),
        ("Use <code> tags sparingly in HTML; they mark inline code.", None),
    ],
)
def test_rules(reply, reason):
    assert degenerate(reply, "What is the capital of France?") == reason


def test_non_ascii_prompt_allows_non_ascii_reply():
    assert degenerate("Paris est la capitale.", "Quelle est la capitale?") is None
    assert degenerate("Это Париж, столица Франции.", "Какая столица Франции?") is None


def test_helpful():
    q = "How do I repot a root-bound houseplant?"
    good = "Water it, ease the plant out, loosen the roots and repot it in a pot one size up."
    assert helpful(q, good, refused=False)
    assert not helpful(q, good, refused=True)
    assert not helpful(q, "Repot it.", refused=False)  # too short to help
    assert not helpful(q, "The weather in Lisbon is mild in spring and warm in summer.", False)
    assert on_topic(q, "Repotting needs a bigger pot and fresh soil, then water well.")
