"""SFT end to end on Ray Train: 2 CPU workers (gloo, FSDP2), the tiny model, a small tuple file.

Three fits (each starts a controller and two worker processes, the bulk of the time): a LoRA
run, and a full fine-tune stopped after its step-3 checkpoint, then rerun. That a restored
model and optimizer continue exactly is checked in one process (test_train_loop.py); here the
rerun must go on at the right step, schedule and data position, through Ray Train's storage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deliberate_ray import storage
from deliberate_ray.config import Config, override
from deliberate_ray.contracts import TUPLE, to_table
from deliberate_ray.results import TrainResult
from deliberate_ray.train import run_train
from deliberate_ray.train.data import TrainDataError, build_dataset
from deliberate_ray.train.export import export_hf
from deliberate_ray.train.loop import warmup_cosine
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


def make_cfg(workdir: Path, model: str, run_dir: str | None = None, **train: Any) -> Config:
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
    run_dir = run_dir or str(workdir / "run")
    return Config.model_validate({"run_dir": run_dir, "train": base | train})


def metrics(summary: TrainResult) -> list[dict[str, Any]]:
    lines = storage.read_text(summary.metrics_path).splitlines()  # a file or a URI
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


LORA = {"enabled": True, "rank": 8, "alpha": 16, "dropout": 0.0}


@pytest.fixture(scope="module")
def lora_run(ray_session, workdir: Path, tiny_model: str) -> TrainResult:
    """An uninterrupted run (LoRA, gradient checkpointing): 6 steps, 2 checkpoints."""
    cfg = make_cfg(workdir, tiny_model, lora=LORA, lr=2e-2, gradient_checkpointing=True)
    return run_train(override(cfg.train, "train", name="lora"), cfg.run_dir)


def test_full_finetune_stopped_after_a_checkpoint_resumes_there(
    workdir: Path, tiny_model: str, lora_run: TrainResult, s3_bucket: str, tmp_path: Path
) -> None:
    """Stopped after its step-3 checkpoint and run again, with `run_dir` in a bucket (the
    loopback S3 server of conftest.py): checkpoints, metrics and export live in the bucket,
    and the rerun resumes from the bucket's checkpoint."""
    import fsspec

    from deliberate_ray.models import resolve_model

    cfg = make_cfg(workdir, tiny_model, run_dir=f"{s3_bucket}/run")
    first = run_train(override(cfg.train, "train", name="full"), cfg.run_dir, stop_after=3)
    assert [r["step"] for r in metrics(first)] == [1, 2, 3]
    assert first.checkpoint_path == f"{s3_bucket}/run/train/full/step_000003"

    second = run_train(override(cfg.train, "train", name="full"), cfg.run_dir)
    rows = metrics(second)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # no step trained twice
    assert [r["resumed_at"] for r in rows] == [0, 0, 0, 3, 3, 3]  # from the bucket's step 3
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert second.final_loss == pytest.approx(rows[-1]["loss"])
    # The schedule goes on where it stopped, and so does the data: the uninterrupted LoRA run
    # (local run_dir) reads the same rows in the same order (the data does not depend on the
    # model, nor on where the run folder is).
    schedule = warmup_cosine(math.ceil(0.2 * 6), 6)
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * schedule(s) for s in range(6)])
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in metrics(lora_run)]
    run = f"{s3_bucket}/run/train/full"
    assert (second.run_dir, second.export_dir) == (run, f"{run}/export")
    fs = fsspec.filesystem("s3")
    names = {storage.name(p) for p in fs.ls(run.removeprefix("s3://"), refresh=True)}
    assert {"metrics.jsonl", "export", "step_000003", "step_000006"} <= names, names
    assert not any(p.name.startswith("s3:") for p in Path.cwd().iterdir())  # no local `s3:`

    export = Path(resolve_model(second.export_dir))  # downloaded once into the cache
    assert export == Path(storage.local_copy(second.export_dir))
    assert second.export_kind == "full" and (export / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((export / "config.json").read_text())
    assert (export / "chat_template.jinja").exists()
    # A cot student ships the template it was trained with: the think block opened for it.
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(str(export)).apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert served.endswith("<think>\n")
    generate(str(export), str(export))
    # The export step reads a checkpoint URI too (downloaded to a temp folder first).
    again = export_hf(second.checkpoint_path, cfg.train, tmp_path / "e")
    assert again["export_dir"] == str(tmp_path / "e")
    assert (tmp_path / "e" / "model.safetensors").read_bytes() == (
        export / "model.safetensors"
    ).read_bytes()


def test_lora_trains_and_exports_merged_and_as_adapter(
    workdir: Path, tiny_model: str, lora_run: TrainResult
) -> None:
    rows = metrics(lora_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert lora_run.export_kind == "lora_merged"
    merged_logits = generate(lora_run.export_dir, lora_run.export_dir)

    cfg = make_cfg(workdir, tiny_model, lora=LORA | {"merge_on_export": False})
    tcfg = train_config(cfg)
    adapter_dir = workdir / "lora-adapter"
    info = export_hf(lora_run.checkpoint_path, tcfg, adapter_dir)
    assert info["export_kind"] == "lora_adapter"
    assert (adapter_dir / "adapter_config.json").exists()
    adapter_logits = generate(str(adapter_dir), str(adapter_dir))
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-4, rtol=1e-4)


def test_documents_mixed_with_chat_rows(ray_session, workdir: Path, tiny_model: str) -> None:
    docs = [{"text": "Rule VIO-2 exists because instructions enable harm. " * k} for k in (1, 9)]
    pq.write_table(pa.Table.from_pylist(docs), workdir / "docs.parquet")
    chat = [
        [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]
        for i in range(40)
    ]
    chat.append([{"role": "user", "content": "a prompt with no reply"}])
    mix_path = workdir / "general.jsonl"
    mix_path.write_text("\n".join(json.dumps({"messages": m}) for m in chat))
    mix = {"variant": "docs", "max_seq_len": 64, "mix_data": str(mix_path), "mix_ratio": 0.5}
    cfg = make_cfg(workdir, tiny_model, **mix).train
    assert cfg is not None

    ds, stats = build_dataset(cfg, [str(workdir / "docs.parquet")])
    # ~12 and ~100 tokens: the long one splits into 64 + ~37; 3 chat rows make half the mix.
    assert (stats.examples, stats.mixed_in) == (3, 3)
    assert stats.dropped == {"mix_no_final_assistant_turn": 1}
    assert stats.rows < 6  # packed
    assert ds.schema().names == ["input_ids", "labels", "position_ids", "num_tokens"]

    tuples_cfg = cfg.model_copy(update={"variant": "cot"})
    with pytest.raises(TrainDataError, match=r"lacks column\(s\) \['messages', 'cot', 'answer'\]"):
        build_dataset(tuples_cfg, [str(workdir / "docs.parquet")])
    with pytest.raises(TrainDataError, match="file not found"):
        build_dataset(tuples_cfg, [str(workdir / "nope.parquet")])
    with pytest.raises(TrainDataError, match="one step takes"):
        plan_steps(cfg.model_copy(update={"micro_batch_size": 64}), stats, workdir, None)


def test_a_finished_run_leaves_no_controller_behind(lora_run: TrainResult) -> None:
    """Ray Train's SIGINT handler holds the run's controller actor; run_train puts the
    handler back, so the controller goes (it held ~0.25 GiB through the pipeline's eval)."""
    import gc
    import time

    import psutil

    def controllers() -> list[str]:
        titles = []
        for p in psutil.process_iter(["cmdline"]):
            title = " ".join(p.info["cmdline"] or [])
            if title.startswith("ray::TrainController"):
                titles.append(title)
        return titles

    gc.collect()
    alive = controllers()
    for _ in range(30):
        if not alive:
            break
        time.sleep(1)
        alive = controllers()
    assert not alive, alive
