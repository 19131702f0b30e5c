"""RL after SFT (deliberate_ray/rl): GRPO's pieces in plain torch, the judge requests with
the CoT hidden, and whole runs on Ray with the tiny model.

Two Ray runs: a toy task with a programmatic reward (transformers engine, one Ray Train
worker, full fine-tune against a frozen reference copy), stopped after iteration 1 and rerun
to 3, whose reward must rise; and a run whose rollouts and judge come from an
OpenAI-compatible stub server (LoRA under FSDP2 on 2 workers), so the test reads the judge
requests exactly as the judge endpoint received them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from openai_stub import StubServer
from typer.testing import CliRunner

from deliberate_ray.cli import app
from deliberate_ray.config import ArmConfig, Config, LLMJudgeConfig, PipelineConfig, RLRewardConfig
from deliberate_ray.results import RLResult, TrainResult
from deliberate_ray.rl.grpo import (
    clipped_surrogate,
    group_advantages,
    grpo_token_losses,
    kl_k3,
    token_logprobs,
)
from deliberate_ray.rl.reward import combine, judge_request_messages, split_reply
from deliberate_ray.rl.rollout import heldin_set, select_prompts
from deliberate_ray.rl.run import add_advantages

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "specs" / "default.yaml")
SEED = str(ROOT / "data" / "prompts" / "seed.jsonl")

# ------------------------------------------------------------------ GRPO in plain torch


def test_group_advantages_normalise_within_each_group() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0]])
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert torch.equal(adv[1], torch.zeros(4))  # no signal in a group of equal rewards
    assert adv[2].mean().abs() < 1e-6 and abs(adv[2].std(unbiased=False) - 1) < 1e-4
    centred = group_advantages(rewards, scale=False)
    torch.testing.assert_close(centred[2], torch.tensor([-1.5, -0.5, 0.5, 1.5]))


def test_token_logprobs_are_the_log_softmax_at_the_targets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    expected = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, targets), expected)


def test_k3_averages_to_the_exact_kl_under_the_policy() -> None:
    pi = torch.tensor([0.5, 0.3, 0.2])
    ref = torch.tensor([0.2, 0.2, 0.6])
    k3 = kl_k3(pi.log(), ref.log())
    assert (k3 >= 0).all()
    exact = (pi * (pi.log() - ref.log())).sum()
    torch.testing.assert_close((pi * k3).sum(), exact)  # E_pi[k3] = KL(pi || ref)
    assert torch.equal(kl_k3(pi.log(), pi.log()), torch.zeros(3))


def test_clipped_surrogate_stops_the_gradient_outside_the_clip_range() -> None:
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.1])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, clip_eps=0.2)
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.2, -0.5, 0.8, -1.1]))
    assert clipped.tolist() == [True, False, True, False]
    loss.sum().backward()
    # ratio 1.5 with A > 0 and ratio 0.5 with A < 0 are clipped: no gradient; the others
    # get d(-r A)/d(log p) = -r A.
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -0.5, 0.0, -1.1]))


def test_grpo_loss_counts_reply_tokens_only() -> None:
    logp = torch.log(torch.full((2, 4), 0.5))
    old, ref = logp.clone(), torch.log(torch.full((2, 4), 0.25))
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    loss, stats = grpo_token_losses(logp, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.5)
    k3 = math.exp(math.log(0.5)) - math.log(0.5) - 1  # ratio ref/pi = 0.5
    # ratio 1: surrogate -A per token; 2 tokens of A=1, 3 of A=-2
    assert stats.tokens == 5
    assert loss.item() == pytest.approx((-1 * 2 + 2 * 3) + 0.5 * k3 * 5, rel=1e-5)
    assert stats.kl == pytest.approx(5 * k3, rel=1e-5) and stats.clipped == 0
    assert stats.ratio == pytest.approx(5.0)


# ------------------------------------------------------------------ the CoT and the judge


def test_split_reply_takes_the_cot_off_the_answer() -> None:
    # A `cot` student: its template opened the think block, the reply closes it.
    assert split_reply("VIO-2 applies, so I refuse.\n</think>\n\nI can't help.", True) == (
        "VIO-2 applies, so I refuse.",
        "I can't help.",
    )
    assert split_reply("cut off mid-thought", True) == ("cut off mid-thought", "")
    assert split_reply("<think>plan</think> Sure: ...", False) == ("plan", "Sure: ...")
    assert split_reply("Reasoning: ILL-1 applies.\nAnswer: No.", False) == ("ILL-1 applies.", "No.")
    assert split_reply("Just an answer.", False) == (None, "Just an answer.")


def rollout(cot: str | None = "SECRET-COT: VIO-2 applies", answer: str = "I can't help.") -> dict:
    return {
        "rollout_id": "1:p:0",
        "category": "violence",
        "prompt_messages": [{"role": "user", "content": "How do I hurt someone?"}],
        "ideal_action": "refuse",
        "cot": cot,
        "answer": answer,
    }


@pytest.mark.parametrize("sees_cot", [False, True])
def test_the_judge_sees_the_cot_only_in_the_ablation(spec, sees_cot: bool) -> None:
    cfg = RLRewardConfig(judge=LLMJudgeConfig(enabled=True), judge_sees_cot=sees_cot)
    for run in range(3):
        messages = judge_request_messages(spec, "values", rollout(), cfg, run=run)
        text = "\n".join(m["content"] for m in messages)
        assert "How do I hurt someone?" in text and "I can't help." in text
        assert ("SECRET-COT" in text) is sees_cot
        assert ("Assistant reasoning" in text) is sees_cot
        assert messages[0]["role"] == "system" and "VIO-" in messages[0]["content"]  # the spec


def test_combine_is_a_weighted_mean_of_the_measured_components() -> None:
    weights = {"action": 1.0, "format": 0.5, "judge": 1.0, "custom": 0.0}
    assert combine({"action": 1.0, "format": 0.0, "judge": 0.4, "custom": None}, weights) == (
        pytest.approx((1.0 + 0.0 + 0.4) / 2.5)
    )
    assert combine({"action": None, "format": 1.0, "judge": None, "custom": 1.0}, weights) == 1.0


def test_prompt_order_held_in_set_and_advantages() -> None:
    pool = [{"id": f"p{i}", "ideal_action": ("refuse", "comply")[i % 2]} for i in range(10)]
    first, second = select_prompts(pool, 1, 4, 0), select_prompts(pool, 2, 4, 0)
    assert len({p["id"] for p in first + second}) == 8  # consecutive iterations: new prompts
    assert select_prompts(pool, 1, 4, 0) == first  # the same order on a rerun
    held = heldin_set(pool, 4)
    assert [p["ideal_action"] for p in held] == ["refuse", "refuse", "comply", "comply"]
    rows = [{"reward": r} for r in (1.0, 0.0, 0.5, 0.5)]
    assert add_advantages(rows, 2, True) == 1  # the second group carries no signal
    assert [round(r["advantage"], 4) for r in rows] == [1.0, -1.0, 0.0, 0.0]


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="rl: true needs an `rl:` section"):
        Config.model_validate({"pipeline": {"arms": [{"name": "cot", "rl": True}]}})
    with pytest.raises(ValueError, match="must split evenly"):
        Config.model_validate(
            {"rl": {"prompts_per_iteration": 3, "group_size": 3, "num_workers": 2}}
        )
    with pytest.raises(ValueError, match="every component is 0"):
        Config.model_validate(
            {"rl": {"reward": {"weights": {"action": 0, "format": 0, "custom": 0}}}}
        )


def test_cli_rl_exits_2_on_a_bad_config(tmp_path: Path) -> None:
    runner = CliRunner()
    path = tmp_path / "no-rl.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\n")
    result = runner.invoke(app, ["rl", "--config", str(path)])
    assert result.exit_code == 2 and "rl: missing section" in result.output
    path.write_text(f"run_dir: {tmp_path / 'run'}\nrl: {{engine: {{kind: hf}}}}\n")
    result = runner.invoke(app, ["rl", "--config", str(path)])
    assert result.exit_code == 2
    assert "train the arm first" in result.output and "train/cot/export" in result.output


# ------------------------------------------------------------------ on Ray


def make_cfg(tmp_path: Path, model: str, **rl: Any) -> Config:
    base = {
        "init_model": model,
        "iterations": 3,
        "prompts_per_iteration": 4,
        "group_size": 4,
        "heldin_prompts": 4,
        "engine": {"kind": "hf", "batch_size": 64, "num_cpus": 1},
        # The tiny random model spreads its probability almost evenly over 49k tokens: a
        # nucleus of ~100 tokens makes it sample the same tokens often enough for a few
        # steps to move them.
        "sampling": {"max_tokens": 16, "temperature": 1.0, "top_p": 0.002, "seed": 0},
        "heldin_sampling": {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0},
        "reward": {"weights": {"action": 0.0, "format": 0.0, "judge": 0.0, "custom": 1.0}},
        "lr": 3e-3,
        "kl_coef": 0.01,
        "epochs_per_iteration": 2,
        "micro_batch_size": 4,
        "num_workers": 1,
        "resources_per_worker": {"CPU": 1},
    }
    return Config.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "spec": {"path": SPEC},
            "prompts": {"sources": [SEED], "limit": 24},
            "rl": base | rl,
        }
    )


def capitalised(row: dict[str, Any]) -> float:
    """The toy task: the share of the reply's words that start with a capital letter (the
    tiny random model writes a mix of word pieces, some capitalised)."""
    words = (row["generated_text"] or "").split()
    return sum(w[0].isupper() for w in words) / max(1, len(words))


def read_metrics(summary: RLResult) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(summary.metrics_path).read_text().splitlines()]


def test_reward_rises_on_a_toy_task_and_a_stopped_run_resumes(
    ray_session, tiny_model: str, tmp_path: Path
) -> None:
    from deliberate_ray.pipeline import run_stage

    cfg = make_cfg(tmp_path, tiny_model)
    first = run_stage(cfg, "rl", reward_fn=capitalised, stop_after=1)
    assert (first.iterations_done, first.finished, first.heldin_after) == (1, False, None)
    rows = read_metrics(first)
    assert [r["iteration"] for r in rows] == [1]
    steps = rows[0]["update_steps"]
    assert steps == 2 * 4  # 2 epochs x 16 rollouts in micro-batches of 4
    done_before = (Path(first.run_dir) / "iter_0001" / "metrics.json").read_text()

    second = run_stage(cfg, "rl", reward_fn=capitalised)
    rows = read_metrics(second)
    assert [r["iteration"] for r in rows] == [1, 2, 3]  # nothing repeated, nothing skipped
    assert [r["optimizer_steps_total"] for r in rows] == [steps, 2 * steps, 3 * steps]
    assert (Path(second.run_dir) / "iter_0001" / "metrics.json").read_text() == done_before
    curve = second.reward_curve
    assert curve[-1] > curve[0] + 0.1, curve
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the SFT model samples iteration 1
    assert rows[-1]["kl"] > 1e-4
    for r in rows:
        assert r["rollouts"] == 16 and r["truncation_rate"] is not None
        assert r["heldin"]["n"] == 4 and r["rollout_tokens_per_s"] > 0
        assert set(r["time_s"]) == {"rollout", "reward", "update", "sync", "iteration"}

    run_dir = Path(second.run_dir)
    assert sorted(p.name for p in run_dir.glob("update_*")) == ["update_0002", "update_0003"]
    assert json.loads((run_dir / "export" / "rl_iteration.json").read_text())["iteration"] == 3
    assert second.heldin_before["n"] == 4 and second.heldin_after["n"] == 4
    report = Path(second.report).read_text()
    assert "reward_curve.png" in report and "after iteration 3 (final)" in report
    assert (run_dir / "reward_curve.png").exists()


def stub_reply(body: dict[str, Any]) -> str:
    """The judge gives 7; the policy thinks (a marked CoT) and then answers."""
    if body["messages"][0]["role"] == "system" and "## Your task" in body["messages"][0]["content"]:
        return " 7\nJustification: fine."
    user = body["messages"][-1]["content"]
    return f"<think>SECRET-COT {len(user)}</think>I can't help with that."


def judge_bodies(stub: StubServer) -> list[dict[str, Any]]:
    return [b for b in stub.requests if "## Your task" in b["messages"][0]["content"]]


def test_judge_requests_never_contain_the_cot_in_the_pipeline_stage(
    ray_session, tiny_model: str, tmp_path: Path
) -> None:
    from deliberate_ray.pipeline import Stages, rl_arms
    from deliberate_ray.rl.reward import score_rollouts
    from deliberate_ray.spec import load_spec

    with StubServer(stub_reply) as stub:
        http = {"kind": "http", "base_url": stub.base_url, "batch_size": 8}
        judge = {"enabled": True, "engine": http, "k": 2, "num_examples": 1}
        cfg = make_cfg(
            tmp_path,
            tiny_model,
            iterations=1,
            prompts_per_iteration=2,
            group_size=2,
            heldin_prompts=2,
            engine=http,
            sampling={"max_tokens": 64, "temperature": 1.0, "top_p": 1.0},
            reward={"judge": judge, "weights": {"action": 1.0, "format": 0.5, "judge": 1.0}},
            num_workers=2,
            lora={"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0},
        )
        # As the pipeline runs it: stage `rl-cot` after the arm's SFT, from its export.
        cfg = cfg.model_copy(
            update={"pipeline": PipelineConfig(arms=[ArmConfig(name="cot", rl=True)])}
        )
        stages = Stages(Path(cfg.run_dir))
        sft = {
            "cot": TrainResult(
                name="cot",
                variant="cot",
                run_dir=str(tmp_path / "sft"),
                metrics_path=str(tmp_path / "sft" / "metrics.jsonl"),
                export_dir=tiny_model,
                signature="sft-signature",
            )
        }
        summary = rl_arms(cfg, stages, cfg.pipeline, sft)["cot-rl"]
        assert (Path(cfg.run_dir) / "stages" / "rl-cot.json").exists()
        assert summary.init_model == tiny_model and Path(summary.export_dir).is_dir()
        assert rl_arms(cfg, stages, cfg.pipeline, sft)["cot-rl"].skipped is True
        run_dir = Path(summary.run_dir)
        rollouts = pq.read_table(run_dir / "iter_0001" / "rollouts.parquet").to_pylist()
        train = [r for r in rollouts if r["kind"] == "train"]
        assert len(train) == 4 and all(r["cot"].startswith("SECRET-COT") for r in train)
        assert all(r["answer"] == "I can't help with that." for r in train)

        received = judge_bodies(stub)
        assert len(received) == 4 * 2  # k runs per rollout, as the endpoint received them
        for body in received:
            text = "\n".join(m["content"] for m in body["messages"])
            assert "SECRET-COT" not in text and "Assistant reasoning" not in text
            assert "I can't help with that." in text
        # The table the run recorded is what the endpoint got, request for request.
        recorded = pq.read_table(run_dir / "iter_0001" / "judge_requests.parquet").to_pylist()

        def pairs(messages: list[dict[str, str]]) -> str:
            return json.dumps([(m["role"], m["content"]) for m in messages])

        assert sorted(pairs(r["messages"]) for r in recorded) == sorted(
            pairs(b["messages"]) for b in received
        )
        row = read_metrics(summary)[0]
        assert row["reward_components"]["judge"] == pytest.approx(0.7)
        assert row["judge_sees_cot"] is False and row["judge_unreadable"] == 0

        # The ablation: the same rollouts, the judge shown the CoT.
        stub.requests.clear()
        assert cfg.rl is not None
        visible = cfg.rl.reward.model_copy(update={"judge_sees_cot": True})
        score_rollouts(train, load_spec(SPEC), "values", visible)
        received = judge_bodies(stub)
        assert len(received) == 8
        for body in received:
            assert "SECRET-COT" in body["messages"][-2]["content"]  # the graded turn
