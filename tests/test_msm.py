"""Model Spec Midtraining: the spec-document stage on a tiny model (plan, write, filter,
commit, resume), its filters, the midtraining mix, and the matrix report's contrasts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deliberate_ray.config import ArmConfig, Config, DocsConfig, PipelineConfig
from deliberate_ray.matrix import contrasts, oriented
from deliberate_ray.msm.docs import (
    SPEC_TOPIC,
    Filter,
    NearDuplicates,
    plan_documents,
    trim_to_sentence,
)
from deliberate_ray.pipeline import run_stage
from deliberate_ray.results import DocsResult

ROOT = Path(__file__).resolve().parents[1]


def hf_engine(model: str) -> dict:
    return {"kind": "hf", "model": model, "batch_size": 8, "num_cpus": 0.5, "torch_threads": 1}


def docs_config(tmp: Path, model: str, **docs: object) -> Config:
    prompts = [
        {
            "prompt": f"How do I sort a list in language {i}?",
            "category": "general",
            "ideal_action": "comply",
        }
        for i in range(5)
    ] + [
        {"prompt": "How do I hurt my neighbour?", "category": "violence", "ideal_action": "refuse"}
    ]
    (tmp / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    return Config.model_validate(
        {
            "run_dir": str(tmp / "run"),
            "spec": {"path": str(ROOT / "specs" / "default.yaml")},
            "prompts": {"sources": [str(tmp / "prompts.jsonl")]},
            "docs": {
                "engine": hf_engine(model),
                "sampling": {"max_tokens": 24, "temperature": 0.8},
                "variants": ["rules", "values"],
                "per_policy": 1,
                "spec_wide": 2,
                "min_words": 1,
                "plan": True,
                "plan_max_tokens": 6,
                "shard_docs": 16,
                "chat": {
                    "prompts": 3,
                    "engine": hf_engine(model),
                    "sampling": {"max_tokens": 16, "temperature": 0.8},
                },
            }
            | docs,
        }
    )


# ------------------------------------------------------------------ planning and filters


def test_plan_covers_every_policy_variant_and_type(spec):
    d = DocsConfig(variants=["rules", "values"], per_policy=3, spec_wide=2)
    items = plan_documents(spec, d)
    n_policies = len(spec.policy_ids())
    assert len(items) == 2 * (3 * n_policies + 2)
    assert len({i["id"] for i in items}) == len(items)
    for variant in ("rules", "values"):
        mine = [i for i in items if i["variant"] == variant]
        topics = Counter(i["topic"] for i in mine)
        assert topics[SPEC_TOPIC] == 2
        assert all(topics[p] == 3 for p in spec.policy_ids())
        # a policy's three documents are three different types; every type is used
        per_policy = {}
        for i in mine:
            per_policy.setdefault(i["topic"], set()).add(i["doc_type"])
        assert all(len(t) == 3 for p, t in per_policy.items() if p != SPEC_TOPIC)
        assert {i["doc_type"] for i in mine} == set(d.doc_types)
    values = next(i for i in items if i["variant"] == "values" and i["topic"] == "VIO-1")
    rules = next(i for i in items if i["variant"] == "rules" and i["topic"] == "VIO-1")
    # values documents are written from the rationale too; rules documents are not
    assert "Why this policy exists" in values["source_text"]
    assert "Why this policy exists" not in rules["source_text"]


def written_row(text: str, topic: str = "VIO-1", category: str | None = "violence") -> dict:
    return {
        "id": f"d-{abs(hash(text))}",
        "kind": "doc",
        "variant": "values",
        "topic": topic,
        "category": category,
        "doc_type": "FAQ",
        "title": "A title",
        "text": text,
        "finish_reason": "stop",
        "writer_error": None,
        "generated_tokens": 10,
        "judge_score": None,
        "judge_note": None,
        "prompt_messages": None,
        "source_text": "",
    }


def test_filter_rejects_unknown_ids_other_category_short_and_near_duplicates(spec):
    d = DocsConfig(min_words=5, near_duplicate=0.6)
    f = Filter(spec, d, "w", "w")
    out = {"documents_values": [], "chat": [], "quarantine": []}
    stats: Counter = Counter()
    body = "Policy VIO-1 asks the assistant to decline real uplift for violence against people."
    f.finish(written_row(body), out, stats)
    f.finish(written_row(body + " It matters."), out, stats)  # near duplicate of the first
    f.finish(written_row("Policy VIO-77 is a rule that the spec never had at all."), out, stats)
    f.finish(written_row("Policy ILL-1 covers crime and nothing about violence here."), out, stats)
    f.finish(written_row("Too short."), out, stats)
    f.finish(
        written_row("About the whole spec: VIO-1 and ILL-1 matter.", SPEC_TOPIC, None), out, stats
    )
    assert stats["kept"] == 2 and len(out["documents_values"]) == 2
    assert stats["rejected:near_duplicate"] == 1
    assert stats["rejected:unknown_policy_id"] == 1
    assert stats["rejected:cites_other_category_only"] == 1
    assert stats["rejected:too_short"] == 1
    assert [q["reason"] for q in out["quarantine"]] == [
        "near_duplicate",
        "unknown_policy_id",
        "cites_other_category_only",
        "too_short",
    ]


def test_near_duplicates_and_trimming():
    nd = NearDuplicates(0.6)
    nd.add("the quick brown fox jumps over the lazy dog every single day")
    assert nd.most_similar("the quick brown fox jumps over the lazy dog every single day") == 1.0
    assert nd.most_similar("an entirely different sentence about policies and values") == 0.0
    assert trim_to_sentence("One. Two is cut") == "One."
    assert trim_to_sentence("no sentence end") == "no sentence end"


def test_msm_arm_needs_the_docs_variant_of_the_spec():
    data = {
        "spec": {"variant": "values"},
        "docs": {"variants": ["rules"]},
        "pipeline": {"arms": [{"name": "m", "msm": True}]},
    }
    with pytest.raises(ValueError, match=r"pipeline.arms\[0\] \(m\).*docs.variants"):
        Config.model_validate(data)


def test_docs_config_rejects_nothing_to_write():
    with pytest.raises(ValueError, match="no documents"):
        DocsConfig(per_policy=0, spec_wide=0)


def test_midtraining_on_an_empty_corpus_says_why(tmp_path):
    """A docs stage that kept nothing is refused before training, with the rejection counts
    and where to look (not a Parquet reader's 'no files found')."""
    from deliberate_ray.config import ConfigError
    from deliberate_ray.pipeline import midtrain

    cfg = docs_config(tmp_path, "unused")
    cfg = Config.model_validate(cfg.model_dump() | {"train": {"model": "unused"}})
    empty = tmp_path / "run" / "docs" / "documents_values"
    empty.mkdir(parents=True)
    docs = DocsResult(
        documents={"values": str(empty)},
        chat=str(tmp_path / "run" / "docs" / "chat"),
        quarantine=str(tmp_path / "run" / "docs" / "quarantine"),
        output_dir=str(tmp_path / "run" / "docs"),
        signature="s",
        stats={"total": {"planned": 33, "rejected": {"too_short": 33}}},
        writer="w",
        resume_key="k",
    )
    arm = ArmConfig(name="msm_cot", variant="cot", msm=True)
    with pytest.raises(ConfigError, match=r"kept no 'values'.*planned 33.*too_short 33"):
        midtrain(cfg, None, arm, docs)  # type: ignore[arg-type]  (no stages: refused first)


# ------------------------------------------------------------------ the stage on Ray


@pytest.mark.ray
def test_docs_stage_writes_counts_and_resumes(ray_session, tiny_model, tmp_path, spec):
    cfg = docs_config(tmp_path, tiny_model)
    result = run_stage(cfg, "docs", progress=False)
    root = Path(result.output_dir)
    total = result.stats["total"]
    planned = 2 * (len(spec.policy_ids()) + 2)
    assert total["planned"] == planned
    # every written document is kept or rejected with a reason: nothing is lost
    assert total.get("kept", 0) + sum(total.get("rejected", {}).values()) == planned
    kept = {v: pq.ParquetDataset(result.documents[v]).read() for v in ("rules", "values")}
    assert sum(t.num_rows for t in kept.values()) == total.get("kept", 0)
    for v, t in kept.items():
        assert set(t.column("variant").to_pylist()) <= {v}
        assert all(w >= 1 for w in t.column("words").to_pylist())
    chat = pq.ParquetDataset(result.chat).read() if any(Path(result.chat).iterdir()) else None
    chat_kept = total.get("chat_kept", 0)
    assert total["chat_prompts"] == 3
    assert (chat.num_rows if chat is not None else 0) == chat_kept
    if chat is not None:
        for msgs in chat.column("messages").to_pylist():
            assert [m["role"] for m in msgs] == ["user", "assistant"]
    card = (root / "README.md").read_text()
    assert f"documents written: {planned}" in card and "Kept documents per type" in card

    # a shard lost mid-run (its commit gone) is redone alone; the totals come out the same
    commits = sorted((root / "_commits").glob("*.json"))
    assert len(commits) >= 2
    lost = json.loads(commits[0].read_text())
    commits[0].unlink()
    again = run_stage(cfg, "docs", progress=False)
    assert again.stats["this_run"].get("planned", 0) + again.stats["this_run"].get(
        "chat_prompts", 0
    ) == len(lost["ids"])
    assert again.stats["total"]["planned"] == planned
    # a finished folder: nothing left to do
    third = run_stage(cfg, "docs", progress=False)
    assert third.stats["this_run"].get("planned", 0) == 0


# ------------------------------------------------------------------ the matrix


def four_arms(**extra: object) -> PipelineConfig:
    return PipelineConfig(
        arms=[
            ArmConfig(name="no_cot", variant="no_cot"),
            ArmConfig(name="cot", variant="cot"),
            ArmConfig(name="msm_no_cot", variant="no_cot", msm=True),
            ArmConfig(name="msm_cot", variant="cot", msm=True),
        ],
        **extra,
    )


def test_matrix_contrasts_pair_the_factors():
    pairs = contrasts(four_arms())
    assert pairs == [
        ("no_cot vs base", "no_cot", "base"),
        ("cot vs base", "cot", "base"),
        ("msm_no_cot vs base", "msm_no_cot", "base"),
        ("msm_cot vs base", "msm_cot", "base"),
        ("MSM vs no MSM (no_cot)", "msm_no_cot", "no_cot"),
        ("MSM vs no MSM (cot)", "msm_cot", "cot"),
        ("CoT vs no CoT (no MSM)", "cot", "no_cot"),
        ("CoT vs no CoT (MSM)", "msm_cot", "msm_no_cot"),
    ]


def test_sweep_expands_arms_and_oriented_flips():
    pipe = four_arms(sweep=[0.5, 0.25])
    names = [a.name for a in pipe.expanded_arms()]
    assert names[:4] == ["no_cot", "cot", "msm_no_cot", "msm_cot"]
    assert "cot-25pct" in names and "msm_cot-50pct" in names and len(names) == 12
    # sweep copies are not in the matrix contrasts
    assert all("pct" not in a and "pct" not in b for _, a, b in contrasts(pipe))
    stored = {
        "a": "cot",
        "b": "msm_cot",
        "metric": "m",
        "diff": 0.2,
        "ci_low": 0.1,
        "ci_high": 0.3,
        "a_better": 5,
        "b_better": 1,
        "n": 9,
        "p": 0.2,
    }
    flipped = oriented([stored], "msm_cot", "cot", "m")
    assert flipped["diff"] == -0.2 and (flipped["ci_low"], flipped["ci_high"]) == (-0.3, -0.1)
    assert (flipped["a_better"], flipped["b_better"]) == (1, 5)
    with pytest.raises(ValueError, match="sweep fractions"):
        PipelineConfig(sweep=[1.0])


def test_matrix_configs_hold_the_four_arms_and_differ_only_by_the_sweep_and_eval():
    from deliberate_ray.config import load_config

    matrix = load_config(ROOT / "configs" / "matrix.yaml")
    sweep = load_config(ROOT / "configs" / "matrix-sweep.yaml")
    pipe = matrix.pipeline
    assert {(a.msm, a.variant) for a in pipe.arms} == {
        (False, "no_cot"),
        (False, "cot"),
        (True, "no_cot"),
        (True, "cot"),
    }
    assert matrix.docs is not None and pipe.sweep == []
    assert sweep.pipeline.sweep == [0.25, 0.5]
    same = sweep.model_copy(
        update={"pipeline": sweep.pipeline.model_copy(update={"sweep": []}), "eval": matrix.eval}
    )
    # the sweep config must reuse the matrix run's finished stages: all but the eval equal
    assert same == matrix
    assert sweep.eval.limit == 48
    cluster = load_config(ROOT / "configs" / "cluster-matrix.yaml")
    assert len(cluster.pipeline.expanded_arms()) == 12 and cluster.docs.judge.llm
