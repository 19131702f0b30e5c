"""SFT end to end on Ray Train: 2 CPU workers (gloo, FSDP2), the tiny model, a small tuple file.

Four fits in all: a full fine-tune (the reference), the same run stopped after its step-3
checkpoint and rerun, and a LoRA run. The resumed run must reproduce the reference's losses,
which only happens if model, optimizer, scheduler and data position all came back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deliberate_ray.config import Config
from deliberate_ray.contracts import TUPLE, to_table
from deliberate_ray.train import run_train
from deliberate_ray.train.data import TrainDataError, build_dataset
from deliberate_ray.train.export import export_hf
from deliberate_ray.train.run import plan_steps, train_config

pytestmark = pytest.mark.ray


def tuple_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"t-{i}",
            "messages": [{"role": "user", "content": f"Request {i}: how do I stop process {i}?"}],
            "cot": f"POL-{i % 5} applies to request {i}, so I help " + "briefly " * (i % 9),
            "answer": f"Run `kill {i}`; " + "then check again. " * (i % 4),
            "category": "general",
            "ideal_action": "comply",
            "score": 8.0,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("train")
    pq.write_table(to_table(tuple_rows(48), TUPLE), d / "tuples.parquet")
    return d


def make_cfg(workdir: Path, model: str, **train: Any) -> Config:
    base = {
        "model": model,
        "data": [str(workdir / "tuples.parquet")],
        "max_seq_len": 256,
        "micro_batch_size": 2,
        "lr": 3e-3,
        "warmup_ratio": 0.2,
        "max_steps": 6,
        "checkpoint_every": 3,
        "num_workers": 2,
    }
    return Config.model_validate({"run_dir": str(workdir / "run"), "train": base | train})


def metrics(summary: dict[str, Any]) -> list[dict[str, Any]]:
    lines = Path(summary["metrics_path"]).read_text().splitlines()
    return [json.loads(line) for line in lines]


def generate(model_dir: str, tokenizer_dir: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    with torch.no_grad():
        return model(out).logits


@pytest.fixture(scope="module")
def reference(ray_session, workdir: Path, tiny_model: str) -> dict[str, Any]:
    return run_train(make_cfg(workdir, tiny_model), name="full")


def test_full_finetune_loss_falls_and_export_generates(reference: dict[str, Any]) -> None:
    rows = metrics(reference)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert reference["final_loss"] == pytest.approx(rows[-1]["loss"])
    run_dir = Path(reference["run_dir"])
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_000003", "step_000006"]
    export = Path(reference["export_dir"])
    assert reference["export_kind"] == "full" and (export / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((export / "config.json").read_text())
    assert (export / "chat_template.jinja").exists() or "chat_template" in (
        export / "tokenizer_config.json"
    ).read_text()
    generate(str(export), str(export))


def test_stopped_run_resumes_at_its_checkpoint(
    workdir: Path, tiny_model: str, reference: dict[str, Any]
) -> None:
    cfg = make_cfg(workdir, tiny_model)
    first = run_train(cfg, name="resume", stop_after=3)
    assert [r["step"] for r in metrics(first)] == [1, 2, 3]
    second = run_train(cfg, name="resume")
    rows = metrics(second)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    expected = metrics(reference)
    for got, want in zip(rows[3:], expected[3:], strict=True):
        assert got["lr"] == pytest.approx(want["lr"])
        assert got["tokens"] == want["tokens"]  # the same data, in the same order
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_lora_trains_and_exports_merged_and_as_adapter(
    workdir: Path, tiny_model: str, reference: dict[str, Any]
) -> None:
    lora = {"enabled": True, "rank": 8, "alpha": 16, "dropout": 0.0}
    cfg = make_cfg(workdir, tiny_model, lora=lora, lr=2e-2, gradient_checkpointing=True)
    summary = run_train(cfg, name="lora", variant="no_cot")
    rows = metrics(summary)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["export_kind"] == "lora_merged"
    merged_logits = generate(summary["export_dir"], summary["export_dir"])

    tcfg = train_config(cfg, variant="no_cot", model=tiny_model)
    tcfg = tcfg.model_copy(update={"lora": tcfg.lora.model_copy(update={"merge_on_export": False})})
    adapter_dir = workdir / "lora-adapter"
    info = export_hf(summary["checkpoint_path"], tcfg, adapter_dir)
    assert info["export_kind"] == "lora_adapter"
    assert (adapter_dir / "adapter_config.json").exists()
    adapter_logits = generate(str(adapter_dir), str(adapter_dir))
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-4, rtol=1e-4)


def test_docs_and_mixing_build_the_expected_rows(ray_session, workdir: Path, tiny_model: str):
    docs = [{"text": "Rule VIO-2 exists because instructions enable harm. " * k} for k in (1, 9)]
    pq.write_table(pa.Table.from_pylist(docs), workdir / "docs.parquet")
    mix_path = workdir / "general.jsonl"
    mix_path.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Q{i}"},
                        {"role": "assistant", "content": f"A{i}"},
                    ]
                }
            )
            for i in range(40)
        )
    )
    cfg = make_cfg(workdir, tiny_model, variant="docs", max_seq_len=64).train
    assert cfg is not None
    ds, stats = build_dataset(cfg, [str(workdir / "docs.parquet")])
    # ~12 and ~100 tokens: the long one splits into 64 + ~37, which packs with the short one.
    assert (stats.examples, stats.rows, stats.dropped) == (3, 2, {})
    assert ds.schema().names == ["input_ids", "labels", "position_ids", "num_tokens"]

    mix = {"variant": "cot", "max_seq_len": 256, "mix_data": str(mix_path), "mix_ratio": 0.25}
    mixed = cfg.model_copy(update=mix)
    _, stats = build_dataset(mixed, [str(workdir / "tuples.parquet")])
    assert stats.examples == 48 and stats.mixed_in == 16  # 16 / (48 + 16) = 0.25

    with pytest.raises(TrainDataError, match=r"lacks column\(s\) \['messages', 'cot', 'answer'\]"):
        build_dataset(mixed, [str(workdir / "docs.parquet")])
    with pytest.raises(TrainDataError, match="file not found"):
        build_dataset(mixed, [str(workdir / "nope.parquet")])
    with pytest.raises(TrainDataError, match="one step takes"):
        plan_steps(cfg.model_copy(update={"micro_batch_size": 64}), stats, workdir, None)
