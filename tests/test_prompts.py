"""Prompt sources -> Ray Dataset with the prompt contract; every bad row quarantined."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from deliberate_ray.config import PromptsConfig
from deliberate_ray.contracts import PROMPT, QUARANTINE
from deliberate_ray.prompts import PromptSourceError, load_prompts

ROOT = Path(__file__).resolve().parents[1]
CATS = ["violence", "general"]
pytestmark = pytest.mark.ray


def load(sources, **kw):
    ps = load_prompts(PromptsConfig(sources=[str(s) for s in sources], **kw), CATS)
    return ps.prompts.take_all(), ps.quarantine.take_all(), ps


def test_every_invalid_row_is_quarantined_with_reason(ray_session, tmp_path: Path):
    rows = [
        json.dumps(
            {
                "prompt": "How do I kill a Python process?",
                "category": "violence",
                "ideal_action": "comply",
            }
        ),
        json.dumps(
            {
                "prompt": "How do I kill a Python process?",
                "category": "violence",
                "ideal_action": "comply",
            }
        ),
        json.dumps({"prompt": 5, "category": "violence"}),
        "{broken",
        json.dumps({"prompt": "hi", "category": "nope"}),
        json.dumps({"prompt": "hi", "category": "general", "ideal_action": "maybe"}),
        json.dumps(
            {
                "messages": [{"role": "user", "content": "hello there"}],
                "category": "general",
                "source": "chat",
            }
        ),
        json.dumps({"prompt": "   ", "category": "general"}),
        json.dumps({"prompt": "x" * 200, "category": "general"}),
        json.dumps({"messages": [{"role": "bot", "content": "x"}], "category": "general"}),
        json.dumps({"category": "general"}),
        json.dumps(["a list"]),
    ]
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(rows) + "\n\n")
    kept, bad, ps = load([src], max_chars=100)
    assert ps.prompts.schema().base_schema == PROMPT
    assert ps.quarantine.schema().base_schema == QUARANTINE
    assert len(kept) + len(bad) == len(rows), "no row may vanish"
    assert sorted(r["source"] for r in kept) == ["chat", "p"]
    reasons = sorted(r["reason"].split(" ")[0].split(":")[0] for r in bad)
    assert reasons == sorted(
        [
            "duplicate",
            "wrong_type",
            "invalid_json",
            "unknown_category",
            "invalid_ideal_action",
            "missing_text",
            "oversized",
            "wrong_type",
            "missing_text",
            "wrong_type",
        ]
    )
    assert all(r["stage"] == "prompts" and r["raw"] for r in bad)


def test_ids_are_deterministic_and_formats_agree(ray_session, tmp_path: Path):
    recs = [
        {
            "prompt": f"Question number {i}?",
            "category": "general",
            "ideal_action": "comply",
            "source": "s",
        }
        for i in range(5)
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    table = pa.Table.from_pylist(recs)
    pq.write_table(table, tmp_path / "a.parquet")
    pcsv.write_csv(table, tmp_path / "a.csv")
    ids = {}
    for ext in ("jsonl", "parquet", "csv"):
        kept, bad, _ = load([tmp_path / f"a.{ext}"])
        assert not bad
        ids[ext] = sorted(r["id"] for r in kept)
        assert kept[0]["messages"][0]["role"] == "user"
    assert ids["jsonl"] == ids["parquet"] == ids["csv"]
    again, _, _ = load([tmp_path / "a.jsonl"])
    assert sorted(r["id"] for r in again) == ids["jsonl"]
    # the same content in two sources is deduplicated across them
    both, dupes, _ = load([tmp_path / "a.jsonl", tmp_path / "a.parquet"])
    assert len(both) == 5 and len(dupes) == 5


def test_seed_and_eval_sets(ray_session):
    from deliberate_ray.spec import load_spec

    spec = load_spec(ROOT / "specs/default.yaml")
    ps = load_prompts(
        PromptsConfig(sources=[str(ROOT / "data/prompts/seed.jsonl")]), spec.category_ids
    )
    kept, bad = ps.prompts.take_all(), ps.quarantine.take_all()
    assert bad == [] and len(kept) >= 240
    assert set(spec.category_ids) == {r["category"] for r in kept}
    benign = sum(r["ideal_action"] == "comply" for r in kept) / len(kept)
    assert 0.25 <= benign <= 0.45
    seed_texts = {" ".join(r["messages"][-1]["content"].lower().split()) for r in kept}
    evals = [json.loads(line) for line in (ROOT / "data/eval/in_distribution.jsonl").open()]
    assert len(evals) >= 80
    assert not seed_texts & {" ".join(e["prompt"].lower().split()) for e in evals}


def test_unreadable_sources_are_clear_errors(ray_session, tmp_path: Path):
    with pytest.raises(PromptSourceError, match="does not exist"):
        load([tmp_path / "missing.jsonl"])
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(PromptSourceError, match="unknown format"):
        load([tmp_path / "p.txt"])
