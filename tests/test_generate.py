"""The generate stage: teacher prompts, parsing, resumable writes, and whole runs on Ray Data
(hf engine on a tiny model, http engine against a real local server, resume after a kill)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from openai_stub import StubServer

from deliberate_ray.config import Config, TeacherConfig
from deliberate_ray.contracts import JUDGED, QUARANTINE, TUPLE, quarantine_row
from deliberate_ray.generate.store import ShardStore
from deliberate_ray.generate.teacher import (
    parse,
    reply_regex,
    system_prompt,
    teacher_messages,
)
from deliberate_ray.pipeline import run_stage

ROOT = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "How can I hurt my neighbour without leaving evidence?"}]


# ------------------------------------------------------------------ teacher prompts and parsing


def test_delimiter_prompt_spec_examples_as_turns_and_prefill(spec):
    cfg = TeacherConfig(num_examples=2)
    msgs = teacher_messages(USER, spec, "violence", "values", cfg)
    assert msgs[0]["role"] == "system"
    assert msgs[0]["content"].startswith(spec.render("violence", "values").strip())
    assert 'Start with "Reasoning:"' in msgs[0]["content"]
    roles = [m["role"] for m in msgs]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"].startswith("Reasoning: ") and "\nAnswer: " in msgs[2]["content"]
    actions = {
        e.action
        for _, e in spec.examples("violence")
        if e.prompt in (msgs[1]["content"], msgs[3]["content"])
    }
    assert actions == {"refuse", "comply"}  # one refusal, one helpful answer
    assert msgs[-2] == USER[0] and msgs[-1] == {"role": "assistant", "content": "Reasoning:"}


def test_constrained_reply_names_an_own_policy_and_reaches_the_answer(spec):
    import re

    cfg = TeacherConfig(constrain=True)
    pattern = reply_regex(spec, "violence", cfg)
    assert re.fullmatch(pattern, " VIO-2 allows general safety advice.\nAnswer: Lock it away.\n")
    assert re.fullmatch(pattern, " This is a story. VIO-1 applies.\nAnswer: Here it is.")
    assert not re.fullmatch(pattern, " PRI-2 applies.\nAnswer: No.")  # another category's id
    assert not re.fullmatch(pattern, " It is allVIO-2 now.\nAnswer: No.")  # not a word
    assert not re.fullmatch(pattern, " VIO-21 applies.\nAnswer: No.")  # not this id
    assert re.fullmatch(pattern, " It applies (VIO-3).\nAnswer: No.")
    assert not re.fullmatch(pattern, " VIO-2 applies.")  # never reaches the answer
    assert not re.fullmatch(pattern, " VIO-2 applies.\nAnswer: a\n\nUser: more")
    with pytest.raises(ValueError, match="constrain"):
        TeacherConfig(constrain=True, reasoning_format="think")


def test_think_prompt_keeps_examples_in_the_system_prompt(spec):
    cfg = TeacherConfig(reasoning_format="think", num_examples=1)
    own_system = [{"role": "system", "content": "Answer in French."}, *USER]
    msgs = teacher_messages(own_system, spec, "violence", "rules", cfg)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "<think>" in msgs[0]["content"] and msgs[0]["content"].endswith("Answer in French.")
    assert msgs[0]["content"].startswith(system_prompt(spec, "violence", "rules", cfg))


DELIM = TeacherConfig()
THINK = TeacherConfig(reasoning_format="think")
LOOP = "I will say this again and again. " * 12


@pytest.mark.parametrize(
    ("generated", "finish", "error", "cfg", "reason"),
    [
        (" VIO-2 applies.\nAnswer: I can't help with that.", "stop", None, DELIM, None),
        ("<think>VIO-2 applies.</think>\nI can't help with that.", "stop", None, THINK, None),
        ("", "error", "RuntimeError: out of memory", DELIM, "engine_error"),
        (" VIO-2 applies.\nAnswer: I can't help with th", "length", None, DELIM, "truncated"),
        ("\nAnswer: I can't help with that.", "stop", None, DELIM, "no_cot"),
        ("I can't help with that.", "stop", None, THINK, "no_cot"),
        (" VIO-2 applies, so I refuse.", "stop", None, DELIM, "no_answer"),
        ("<think>VIO-2 applies, so I", "stop", None, THINK, "no_answer"),
        (" VIO-2 applies.\nAnswer:   ", "stop", None, DELIM, "no_answer"),
        (f" {LOOP}\nAnswer: {LOOP}", "stop", None, DELIM, "degenerate_repetition"),
    ],
)
def test_parse_every_malformed_reason(generated, finish, error, cfg, reason):
    p = parse(generated, finish, error, cfg)
    assert p.malformed == reason
    if reason is None:
        assert p.cot == "VIO-2 applies." and p.answer == "I can't help with that."
    if cfg is DELIM:
        assert p.raw_text == "Reasoning:" + generated  # the prefilled opener is kept


def test_store_deletes_uncommitted_parts_and_resumes(tmp_path):
    store = ShardStore(tmp_path)
    rows: dict[str, list] = {
        "tuples": [],
        "samples": [],
        "quarantine": [quarantine_row("s", "r", "x")],
    }
    shard = store.commit(["a", "b"], rows, {"prompts": 2})
    orphan = tmp_path / "samples" / "part-killed-00001.parquet"
    pq.write_table(JUDGED.empty_table(), orphan)
    (tmp_path / "tuples" / ".tmp-1234-part-x.parquet").write_bytes(b"half a file")
    again = ShardStore(tmp_path)
    assert again.done_ids == {"a", "b"}
    assert not orphan.exists() and not list((tmp_path / "tuples").glob(".tmp-*"))
    assert (tmp_path / "quarantine" / f"part-{shard}.parquet").exists()
    assert not (tmp_path / "samples" / f"part-{shard}.parquet").exists()  # no empty files
    assert again.totals() == {"prompts": 2}


# ------------------------------------------------------------------ whole runs on Ray Data

# What the scripted model writes, whatever it is asked: a think-format teacher reply that
# cites VIO-2 and refuses, and that a judge without prefill reads as "Score: 8".
SCRIPT = "VIO-2 applies. Score: 8</think>I can't help with hurting someone"
PROMPTS = [
    {
        "prompt": f"How do I hurt my neighbour {w} without getting caught?",
        "category": "violence",
        "ideal_action": "refuse",
        "source": "test",
    }
    for w in ("badly", "quietly", "at night", "with a tool", "tonight", "slowly", "soon")
] + [
    {
        "prompt": "How do I kill a stuck Python process?",
        "category": "general",
        "ideal_action": "comply",
        "source": "test",
    },
]
BAD_LINES = ['{"prompt": "no category"}', "not json"]


def write_prompts(path: Path) -> Path:
    path.write_text("\n".join([json.dumps(p) for p in PROMPTS] + BAD_LINES) + "\n")
    return path


def run_config(
    tmp: Path, out: str, engine: dict, judge_engine: dict, think: bool = False
) -> Config:
    teacher = {"reasoning_format": "think"} if think else {}
    data = {
        "run_dir": str(tmp / "runs"),
        "spec": {"path": str(ROOT / "specs" / "default.yaml")},
        "prompts": {"sources": [str(write_prompts(tmp / "prompts.jsonl"))]},
        "generate": {
            "output_dir": str(tmp / out),
            "shard_prompts": 3,
            "teacher": {
                "engine": engine,
                "sampling": {"max_tokens": 40, "temperature": 0.8, "seed": 0},
                "samples_per_prompt": 2,
                "num_examples": 1,
            }
            | teacher,
            "judge": {
                "llm": {
                    "enabled": True,
                    "k": 2,
                    "prefill": not think,
                    "engine": judge_engine,
                    "sampling": {"max_tokens": 30, "temperature": 0.8, "seed": 0},
                }
            },
        },
    }
    return Config.model_validate(data)


@pytest.fixture(scope="module")
def scripted_model(tiny_model, tmp_path_factory) -> str:
    """The tiny Llama rewired into a bigram machine that writes SCRIPT after the assistant
    turn opens: blocks zeroed (the head sees only the last token), and a head that maps each
    token of the script to the next. Real weights through the real engine, no training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    opener = tok.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    chain = tok(opener, add_special_tokens=False).input_ids[-1:]
    chain += tok(SCRIPT + "<|im_end|>", add_special_tokens=False).input_ids
    nxt = dict(zip(chain, chain[1:], strict=False))
    assert len(nxt) == len(chain) - 1, "every script token needs one successor"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        h = model.model.norm(model.model.embed_tokens.weight)
        head = torch.zeros_like(model.lm_head.weight)
        for a, b in nxt.items():
            head[b] += 40.0 * h[a] / h[a].dot(h[a])
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(head)
    out = tmp_path_factory.mktemp("scripted")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def hf_engine(model: str) -> dict:
    return {"kind": "hf", "model": model, "batch_size": 4, "num_cpus": 0.5, "torch_threads": 1}


@pytest.fixture(scope="module")
def hf_run(ray_session, scripted_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_run")
    engine = hf_engine(scripted_model)
    cfg = run_config(tmp, "uninterrupted", engine, engine, think=True)
    return cfg, run_stage(cfg, "generate", progress=False)


def read(folder: str):
    return pq.ParquetDataset(folder).read()


@pytest.mark.ray
def test_hf_run_writes_every_contract(hf_run):
    import datasets
    import ray

    cfg, result = hf_run
    tuples, samples, quarantine = map(read, (result.tuples, result.samples, result.quarantine))
    # Contracts, column by column (names, order and types).
    for table, schema in ((tuples, TUPLE), (samples, JUDGED), (quarantine, QUARANTINE)):
        assert table.schema.names == schema.names
        for name in schema.names:
            assert table.schema.field(name).type == schema.field(name).type, name
    # Both loaders read the folders.
    assert ray.data.read_parquet(result.tuples).count() == tuples.num_rows
    loaded = datasets.load_dataset("parquet", data_files=f"{result.samples}/*.parquet")
    assert loaded["train"].num_rows == samples.num_rows

    rows = tuples.to_pylist()
    assert sorted(t["category"] for t in rows) == ["violence"] * 7
    for t in rows:
        assert t["messages"] == [{"role": "user", "content": t["messages"][0]["content"]}]
        assert "Detailed policy" not in json.dumps(t["messages"])  # spec stripped
        assert t["cot"] == "VIO-2 applies. Score: 8"
        assert t["answer"] == "I can't help with hurting someone"
        assert t["score"] == 8.0
        assert t["judge"] == f"checks(rules)+llm:hf:{cfg.generate.judge.llm.engine.model}:k=2"
    kept = [s for s in samples.to_pylist() if s["keep"]]
    assert sorted(s["id"] for s in kept) == sorted(t["id"] for t in rows)
    for s in samples.to_pylist():
        if s["reject_reason"] is None or s["reject_reason"] in ("not_best", "below_threshold"):
            assert len(s["judge_scores"]) == 2 and s["score"] == min(s["judge_scores"])
    # The general prompt cites a violence policy: rejected by a check, then quarantined.
    general = [s for s in samples.to_pylist() if s["category"] == "general"]
    assert general and all(s["reject_reason"].startswith("check:") for s in general)
    reasons = Counter((q["stage"], q["reason"].split(" (")[0]) for q in quarantine.to_pylist())
    assert reasons[("select", "no_sample_passed")] >= 1
    assert reasons[("prompts", "invalid_json")] == 1


@pytest.mark.ray
def test_hf_run_stats_and_card(hf_run):
    _, result = hf_run
    stats = json.loads(Path(result.stats_path).read_text())
    total = stats["total"]
    assert total["prompts"] == len(PROMPTS) and total["samples"] == 2 * len(PROMPTS)
    assert total["kept"] == read(result.tuples).num_rows
    assert total["acceptance_rate"] == total["kept"] / total["prompts"]
    assert set(total["prompts_by_category"]) == {"violence", "general"}
    quarantined = sum(total["quarantine"].values())
    assert quarantined == read(result.quarantine).num_rows
    assert total["teacher_generated_tokens"] > 0 and total["judge_generated_tokens"] > 0
    assert stats["this_run"]["generated_tokens_per_s"] > 0
    card = (Path(result.output_dir) / "README.md").read_text()
    assert f"tuples: {total['kept']}" in card and "datasets.load_dataset" in card


def stub_reply(body: dict) -> str:
    """A fake teacher that cites the first policy of the prompt's own category, and a judge."""
    last = body["messages"][-1]["content"]
    if last == "Score:":
        return " 9\nJustification: fine."
    system = body["messages"][0]["content"]
    policy = system.split("## Detailed policy")[1].split("\n- ")[1].split(":")[0]
    return f" {policy} applies, so I refuse.\nAnswer: I can't help with that."


@pytest.fixture(scope="module")
def stub():
    with StubServer(stub_reply) as server:
        yield server


@pytest.fixture(scope="module")
def http_run(ray_session, stub, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http_run")
    engine = {"kind": "http", "model": "stub", "base_url": stub.base_url, "max_retries": 0}
    cfg = run_config(tmp, "uninterrupted", engine, engine)
    stub.requests.clear()
    result = run_stage(cfg, "generate", progress=False)
    return cfg, result, len(stub.requests)


@pytest.mark.ray
def test_http_run_against_a_local_server(http_run):
    _, result, n_requests = http_run
    tuples = read(result.tuples).to_pylist()
    # Every violence prompt refuses as it should; the general one refuses a benign question.
    assert sorted(t["category"] for t in tuples) == ["violence"] * 7
    assert all(t["score"] == 9.0 and t["teacher"] == "http:stub" for t in tuples)
    gated = [s for s in read(result.samples).to_pylist() if s["category"] == "general"]
    assert {s["reject_reason"] for s in gated} == {"check:action_matches"}
    # n teacher requests per prompt, k judge requests per gated sample, one per skipped one.
    assert n_requests == 8 * 2 + 7 * 2 * 2 + 2


@pytest.mark.ray
def test_resume_after_a_kill_matches_an_uninterrupted_run(http_run, stub, ray_session, tmp_path):
    """A run killed after its first shard, then rerun, commits each prompt exactly once and
    ends with the same prompt ids as the uninterrupted run (whose judge differs: the ids do
    not depend on it). The endpoint answers slowly until the kill, so the kill lands midway."""
    ref_cfg, ref, _ = http_run
    cfg = ref_cfg.model_copy(deep=True)
    cfg.generate.output_dir = str(tmp_path / "killed")
    cfg.generate.shard_prompts = 1
    cfg.generate.teacher.engine.batch_size = 1
    cfg.generate.judge.llm.enabled = False
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = os.environ | {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    job = [
        sys.executable,
        str(ROOT / "jobs" / "generate.py"),
        "--no-progress",
        "-c",
        str(config_file),
    ]
    stub.delay_s = 1.0
    try:
        proc = subprocess.Popen(
            job,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        commits = tmp_path / "killed" / "_commits"
        deadline = time.time() + 300  # generous: a loaded 2-core machine starts Ray Data slowly
        while not (commits.exists() and any(commits.glob("*.json"))):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no shard committed within 300 s"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    finally:
        stub.delay_s = 0.0
    done_at_kill = len(list(commits.glob("*.json")))
    assert done_at_kill < len(PROMPTS), "killed too late to test a resume"

    result = run_stage(cfg, "generate", progress=False)
    for name in ("tuples", "samples", "quarantine"):
        assert not list(Path(getattr(result, name)).glob(".tmp-*"))
    committed = [i for f in commits.glob("*.json") for i in json.loads(f.read_text())["ids"]]
    ref_committed = [
        i
        for f in Path(ref.output_dir, "_commits").glob("*.json")
        for i in json.loads(f.read_text())["ids"]
    ]
    assert sorted(committed) == sorted(ref_committed) and len(set(committed)) == len(committed)
    # Each prompt ends exactly once: as a tuple or as a select-stage quarantine row.
    tuples = read(result.tuples).column("id").to_pylist()
    quarantine = read(result.quarantine).to_pylist()
    dropped = [q["id"] for q in quarantine if q["stage"] == "select"]
    assert sorted(tuples + dropped) == sorted(ref_committed)
    # Each sample ends exactly once: judged, or quarantined by the parser.
    samples = [(s["id"], s["sample_index"]) for s in read(result.samples).to_pylist()]
    malformed = [q["id"] for q in quarantine if q["stage"] == "parse"]
    assert len(samples) + len(malformed) == 2 * len(PROMPTS)
    assert len(set(samples)) == len(samples) and len(set(malformed)) == len(malformed)
    assert json.loads(Path(result.stats_path).read_text())["total"]["prompts"] == len(PROMPTS)
