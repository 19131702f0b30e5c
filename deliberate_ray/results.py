"""What each stage returns: one typed result per stage, the record the pipeline stores.

Every stage has the same shape, `run_<stage>(section_config, run_dir, *, <run-level inputs
it reads>, <runtime options>) -> <Stage>Result`: the section of the config it runs (with
the run's cross-section defaults already filled in by `config.resolve_run`), the run
directory (a local folder or a URI), keyword-only inputs shared by the run (the spec, the
prompt pool) and options that change no output (progress bars, `fresh`). The pipeline
stores `result.model_dump()` plus its wall time and signature in
`{run_dir}/stages/<stage>.json` and reads it back with `<Stage>Result.model_validate`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StageResult(BaseModel):
    """Fields every stored stage record has (set by the pipeline's `Stages.run`)."""

    model_config = ConfigDict(extra="forbid")

    wall_s: float | None = Field(default=None, description="Wall time of the stage (s).")
    signature: str | None = Field(
        default=None, description="Hash of the config sections and inputs the stage used."
    )
    skipped: bool = Field(
        default=False, description="True when a rerun found the stage done and skipped it."
    )


class GenerateResult(StageResult):
    output_dir: str = Field(description="The stage's folder (local path or URI).")
    tuples: str = Field(description="Folder of the kept (prompt, CoT, answer) tuples.")
    samples: str = Field(description="Folder of every judged sample.")
    quarantine: str = Field(description="Folder of dropped rows and why.")
    stats_path: str = Field(description="stats.json: counts per stage, reason and category.")
    stats: dict[str, Any] = Field(description="That file's contents (total and this_run).")
    teacher: str = Field(description="The teacher engine that ran.")
    judge: str = Field(description="The judge (programmatic checks, LLM judge) that ran.")
    resume_key: str = Field(description="Hash of spec, teacher and judge that made the rows.")


class DocsResult(StageResult):
    output_dir: str = Field(description="The stage's folder (local path or URI).")
    documents: dict[str, str] = Field(description="Folder of kept documents per spec variant.")
    chat: str = Field(description="Folder of the chat rows mixed into midtraining.")
    quarantine: str = Field(description="Folder of rejected rows and why.")
    stats: dict[str, Any] = Field(description="Counts (total and this_run).")
    writer: str = Field(description="The writer engine that ran.")
    resume_key: str = Field(description="Hash of everything a written row depends on.")


class TrainResult(StageResult):
    name: str = Field(description="Run name (the run folder).")
    variant: str = Field(description="cot, no_cot or docs.")
    run_dir: str = Field(description="The run folder (local path or URI).")
    metrics_path: str = Field(description="metrics.jsonl: one row per optimizer step.")
    final_loss: float | None = Field(default=None, description="Loss of the last step.")
    steps: int | None = Field(default=None, description="Optimizer steps done.")
    data: dict[str, Any] = Field(default_factory=dict, description="Training-data stats.")
    checkpoint_path: str | None = Field(default=None, description="The latest checkpoint.")
    export_dir: str | None = Field(default=None, description="The HF model folder.")
    export_kind: str | None = Field(default=None, description="full, lora_merged or lora_adapter.")
    base_model: str | None = Field(default=None, description="The model it started from.")


class EvalResult(StageResult):
    out_dir: str = Field(description="Folder of responses.parquet, metrics.json, report.md.")
    endpoint: str = Field(description="The OpenAI endpoint asked ('' when served per group).")
    models: list[str] = Field(description="The models evaluated, in order.")
    suites: list[str] = Field(description="Suite names.")
    n_requests: int = Field(description="Requests sent (every failure counted).")
    seconds: float = Field(description="Wall time of answering and grading.")
    style_source: str = Field(description="What graded style: rules or llm_judge.")
    config: dict[str, Any] = Field(description="The eval section that ran.")
    graders: list[str] = Field(description="Refusal graders, headline first.")
    baseline: str = Field(description="The model the paired differences compare against.")
    results: dict[str, Any] = Field(description="Rates with CIs per model and suite.")
    paired: dict[str, Any] = Field(description="Paired differences per suite.")
    monitor: dict[str, Any] = Field(description="CoT monitorability per suite and model.")


class RLResult(StageResult):
    arm: str = Field(description="The arm RL continued.")
    run_dir: str = Field(description="The RL run folder (local path or URI).")
    init_model: str = Field(description="The SFT model it started from.")
    iterations_done: int = Field(description="Iterations finished so far.")
    iterations: int = Field(description="Iterations configured.")
    finished: bool = Field(description="All iterations done.")
    export_dir: str | None = Field(default=None, description="The latest policy's export.")
    metrics_path: str = Field(description="metrics.jsonl: one row per iteration.")
    reward_curve: list[float] = Field(description="Mean reward per iteration.")
    heldin_before: dict[str, Any] | None = Field(default=None, description="Held-in rates.")
    heldin_after: dict[str, Any] | None = Field(default=None, description="Held-in rates.")
    judge_sees_cot: bool = Field(description="The reward judge's view (ablation switch).")
    report: str | None = Field(default=None, description="report.md of the run.")
