"""A bad-input census: one table of broken configs, specs, prompt files, eval suites, CLI
flags and HTTP requests. Every CLI case must exit 2 with a message naming what is wrong, no
traceback, and nothing written under the case's folder (where its run_dir, --out and
--output point); every HTTP case must get a 4xx with an OpenAI-style JSON error body.

Nothing here starts Ray, Serve or a model: `ray.init` is made to fail loudly, and the HTTP
cases drive the Serve app's FastAPI router in process with a stub replica that holds no
model (every case is refused before a model would be asked).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from deliberate_ray.cli import app

ROOT = Path(__file__).resolve().parents[1]
SPEC_PATH = ROOT / "specs" / "default.yaml"
SEED = ROOT / "data" / "prompts" / "seed.jsonl"
SPEC = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
USER = [{"role": "user", "content": "hi"}]
KEY = "k3y-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVED = "tiny"
LIMIT = 64  # the stub server's max_tokens_limit
DEAD_ENDPOINT = "http://127.0.0.1:9/v1"  # never reached: every eval case fails before

runner = CliRunner()


# ------------------------------------------------------------------ what a case does


@dataclass
class Cli:
    """`deliberate-ray ARGS`; `outputs` must not exist afterwards (nor any new file)."""

    args: list[str]
    outputs: list[Path] = field(default_factory=list)
    env: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Http:
    """One request to the Serve app; `status` is the 4xx it must get."""

    method: str
    path: str
    body: bytes | Any = None
    status: int = 400
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))


Build = Callable[[Path], Cli | Http]


def case(id_: str, build: Build, *expect: str) -> Any:
    return pytest.param(build, expect, id=id_)


# ------------------------------------------------------------------ builders


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


def config_file(tmp: Path, data: dict[str, Any], name: str = "config.yaml") -> Path:
    """A config whose run_dir is under tmp and whose spec and prompts are the shipped ones
    unless `data` says otherwise."""
    data = json.loads(json.dumps(data))
    data.setdefault("run_dir", str(tmp / "run"))
    if isinstance(data.get("spec", {}), dict):
        data.setdefault("spec", {}).setdefault("path", str(SPEC_PATH))
    if isinstance(data.get("prompts", {}), dict):
        data.setdefault("prompts", {}).setdefault("sources", [str(SEED)])
    return write(tmp, name, yaml.safe_dump(data))


def validate(data: dict[str, Any]) -> Build:
    """`validate` on a config built from `data` (a config error, or a file it names)."""
    return lambda tmp: Cli(["validate", str(config_file(tmp, data))], [tmp / "run"])


def validate_text(text: str) -> Build:
    """`validate` on a config file with exactly this text."""
    return lambda tmp: Cli(["validate", str(write(tmp, "config.yaml", text))], [tmp / "run"])


def stage(command: str, data: dict[str, Any], *extra: str) -> Build:
    """A stage command (`generate`, `train`, `pipeline`) on a config built from `data`."""

    def build(tmp: Path) -> Cli:
        return Cli([command, "-c", str(config_file(tmp, data)), *extra], [tmp / "run"])

    return build


def spec_with(mutate: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    spec = json.loads(json.dumps(SPEC))
    mutate(spec)
    return spec


def policy(spec: dict[str, Any], cat: int = 0, pol: int = 0) -> dict[str, Any]:
    return spec["categories"][cat]["policies"][pol]


def bad_spec(mutate: Callable[[dict[str, Any]], Any]) -> Build:
    """`validate` on a config whose spec.path is a broken copy of the shipped spec."""

    def build(tmp: Path) -> Cli:
        spec = write(tmp, "spec.yaml", yaml.safe_dump(spec_with(mutate)))
        return Cli(
            ["validate", str(config_file(tmp, {"spec": {"path": str(spec)}}))], [tmp / "run"]
        )

    return build


def spec_cmd_text(text: str | None, *extra: str) -> Build:
    """`spec violence --spec FILE` on a spec file with this text (None: a missing file)."""

    def build(tmp: Path) -> Cli:
        path = tmp / "spec.yaml" if text is None else write(tmp, "spec.yaml", text)
        return Cli(["spec", "violence", "--spec", str(path), *extra])

    return build


def prompt_rows(rows: list[Any], name: str = "p.jsonl", **prompts: Any) -> Build:
    """`validate` on a config whose only prompt source holds these rows (str: a raw line)."""

    def build(tmp: Path) -> Cli:
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        src = write(tmp, name, "".join(line + "\n" for line in lines))
        cfg = config_file(tmp, {"prompts": {"sources": [str(src)], **prompts}})
        return Cli(["validate", str(cfg)], [tmp / "run"])

    return build


def rows_file(tmp: Path, name: str, rows: list[Any] | None) -> Path:
    """A JSONL file of these rows (str: a raw line); None: a path that does not exist."""
    if rows is None:
        return tmp / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return write(tmp, name, "".join(line + "\n" for line in lines))


def suite_rows(rows: list[Any] | None, *extra: str, name: str = "suite.jsonl") -> Build:
    """`eval --suite FILE` (None: a missing file); the suite is checked before the endpoint."""

    def build(tmp: Path) -> Cli:
        path = rows_file(tmp, name, rows)
        out = tmp / "out"
        args = ["eval", "--endpoint", DEAD_ENDPOINT, "--model", "m", "--out", str(out)]
        return Cli([*args, "--suite", str(path), *extra], [out])

    return build


def grade_rows(rows: list[Any] | None, *extra: str, name: str = "in.jsonl") -> Build:
    """`grade --input FILE --output OUT` (None: a missing input file)."""

    def build(tmp: Path) -> Cli:
        inp = rows_file(tmp, name, rows)
        out = tmp / "graded.jsonl"
        return Cli(["grade", "--input", str(inp), "--output", str(out), *extra], [out])

    return build


def eval_with(data: dict[str, Any]) -> Build:
    """`eval -c CONFIG` (config built from `data`) against an endpoint it never reaches."""

    def build(tmp: Path) -> Cli:
        out = tmp / "out"
        args = ["eval", "--endpoint", DEAD_ENDPOINT, "--model", "m", "--out", str(out)]
        return Cli([*args, "-c", str(config_file(tmp, data))], [out])

    return build


def cli(*args: str, env: dict[str, str | None] | None = None) -> Build:
    return lambda tmp: Cli(list(args), env=env or {})


def serve(*args: str) -> Build:
    """`serve ...` with no API key in the environment (so nothing could ever start)."""
    return cli("serve", *args, env={"DELIBERATE_RAY_API_KEY": None})


def chat(body: Any, status: int = 400, headers: dict[str, str] | None = None) -> Build:
    hdrs = dict(AUTH) if headers is None else headers
    return lambda tmp: Http("POST", "/v1/chat/completions", body, status, hdrs)


def req(**fields: Any) -> dict[str, Any]:
    """A valid chat request with some fields replaced."""
    return {"model": SERVED, "messages": USER} | fields


GOOD_ROW = {"prompt": "How do I kill a Python process?", "category": "violence"}
GOOD_SUITE_ROW = {"id": "a", "prompt": "How do I bake bread?", "expected": "comply"}
GOOD_GRADE_ROW = {"prompt": "hi", "completion": "hello"}


# ------------------------------------------------------------------ the table

CONFIG_CASES = [
    case("config-unknown-top-level-key", validate({"runn_dir": "x"}), "runn_dir", "unknown key"),
    case(
        "config-unknown-nested-key",
        validate({"generate": {"teacher": {"engine": {"modle": "x"}}}}),
        "generate.teacher.engine.modle",
        "unknown key",
    ),
    case(
        "config-wrong-type",
        validate({"prompts": {"max_chars": "lots"}}),
        "prompts.max_chars",
        "'lots'",
    ),
    case(
        "config-out-of-bounds",
        validate({"prompts": {"max_chars": 8}}),
        "prompts.max_chars",
        "greater than or equal to 16",
    ),
    case(
        "config-bad-enum",
        validate({"spec": {"variant": "both"}}),
        "spec.variant",
        "'both'",
        "'rules'",
    ),
    case(
        "config-bad-engine-kind",
        validate({"generate": {"teacher": {"engine": {"kind": "tpu"}}}}),
        "generate.teacher.engine.kind",
        "'tpu'",
    ),
    case(
        "config-missing-required-arm-name",
        validate({"pipeline": {"arms": [{"variant": "cot"}]}}),
        "pipeline.arms.0.name",
        "Field required",
    ),
    case("config-invalid-yaml", validate_text("run_dir: [unclosed\n"), "not valid YAML"),
    case("config-root-is-a-list", validate_text("- a\n- b\n"), "expected a mapping, got list"),
    case("config-root-is-a-scalar", validate_text("42\n"), "expected a mapping, got int"),
    case(
        "config-file-not-found",
        lambda tmp: Cli(["validate", str(tmp / "nope.yaml")], [tmp / "run"]),
        "nope.yaml",
        "file not found",
    ),
    case("config-section-not-a-mapping", validate({"train": 5}), "train: bad value 5"),
    case(
        "config-nested-out-of-bounds",
        validate({"generate": {"teacher": {"samples_per_prompt": 0}}}),
        "generate.teacher.samples_per_prompt",
    ),
    case(
        "config-http-engine-without-url",
        validate({"generate": {"teacher": {"engine": {"kind": "http"}}}}),
        "generate.teacher.engine",
        "base_url",
    ),
    case(
        "config-bad-cpu-cores-pattern",
        validate({"generate": {"teacher": {"engine": {"cpu_cores": "0-a"}}}}),
        "generate.teacher.engine.cpu_cores",
        "'0-a'",
    ),
    case(
        "config-judge-threshold-above-10",
        validate({"generate": {"judge": {"threshold": 11}}}),
        "generate.judge.threshold",
    ),
    case(
        "config-no-judge-at-all",
        validate({"generate": {"judge": {"programmatic": False}}}),
        "generate.judge",
        "no judge",
    ),
    case(
        "config-logprobs-without-prefill",
        validate({"generate": {"judge": {"llm": {"scoring": "logprobs", "prefill": False}}}}),
        "generate.judge.llm",
        "prefill: true",
    ),
    case(
        "config-constrain-with-think",
        validate({"generate": {"teacher": {"constrain": True, "reasoning_format": "think"}}}),
        "teacher.constrain",
    ),
    case(
        "config-answer-chars-inverted",
        validate({"generate": {"judge": {"min_answer_chars": 10, "max_answer_chars": 5}}}),
        "max_answer_chars (5) must be >= min_answer_chars (10)",
    ),
    case(
        "config-mix-data-without-ratio",
        validate({"train": {"mix_data": "chat.jsonl"}}),
        "train",
        "mix_data",
        "mix_ratio",
    ),
    case(
        "config-lora-dropout-one",
        validate({"train": {"lora": {"dropout": 1.0}}}),
        "train.lora.dropout",
    ),
    case(
        "config-bad-attn-implementation",
        validate({"train": {"attn_implementation": "flash"}}),
        "train.attn_implementation",
        "'flash'",
    ),
    case("config-bad-train-name", validate({"train": {"name": "../x"}}), "train.name", "'../x'"),
    case("config-serve-port-too-big", validate({"serve": {"port": 70000}}), "serve.port", "70000"),
    case(
        "config-autoscaling-max-below-min",
        validate({"serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}}),
        "serve.autoscaling",
        "max_replicas (1) must be >= min_replicas (3)",
    ),
    case(
        "config-default-max-tokens-above-limit",
        validate({"serve": {"max_tokens_limit": 8, "default_max_tokens": 16}}),
        "default_max_tokens (16) must be <= max_tokens_limit (8)",
    ),
    case(
        "config-bool-given-as-word",
        validate({"serve": {"no_auth": "maybe"}}),
        "serve.no_auth",
        "'maybe'",
    ),
    case(
        "config-one-refusal-grader",
        validate({"eval": {"graders": ["rules"]}}),
        "eval.graders",
        "at least two different refusal graders",
    ),
    case(
        "config-unknown-scorer",
        validate({"eval": {"scorers": ["refusal", "bogus"]}}),
        "eval.scorers",
        "unknown scorer(s) ['bogus']",
    ),
    case(
        "config-scorer-needs-order",
        validate({"eval": {"scorers": ["helpful", "refusal"]}}),
        "eval.scorers",
        "scorer 'helpful' needs ['refusal'] listed before it",
    ),
    case("config-confidence-one", validate({"eval": {"confidence": 1.0}}), "eval.confidence"),
    case(
        "config-eval-suite-missing",
        lambda tmp: validate({"eval": {"suites": [str(tmp / "nope.jsonl")]}})(tmp),
        "eval.suites.0",
        "file not found",
    ),
    case(
        "config-duplicate-arm-names",
        validate({"pipeline": {"arms": [{"name": "a"}, {"name": "a"}]}}),
        "pipeline.arms",
        "arm names must be unique",
    ),
    case(
        "config-arm-named-base",
        validate({"pipeline": {"arms": [{"name": "base"}]}}),
        "pipeline.arms",
        "'base' is reserved",
    ),
    case(
        "config-msm-without-docs",
        validate({"pipeline": {"arms": [{"name": "a", "msm": True}]}}),
        "pipeline.arms[0]",
        "needs a `docs:` section",
    ),
    case("config-no-arms", validate({"pipeline": {"arms": []}}), "pipeline.arms"),
    case("config-no-prompt-sources", validate({"prompts": {"sources": []}}), "prompts.sources"),
    case(
        "config-teacher-model-path-missing",
        lambda tmp: validate(
            {"generate": {"teacher": {"engine": {"model": str(tmp / "no-model")}}}}
        )(tmp),
        "generate.teacher.engine.model",
        "no HF model (config.json) there",
    ),
    case(
        "generate-bad-config",
        stage("generate", {"generate": {"shard_prompts": 0}}),
        "generate.shard_prompts",
    ),
    case(
        "generate-config-without-generate-section",
        stage("generate", {}),
        "has no `generate:` section",
    ),
    case(
        "generate-empty-config-file",
        lambda tmp: Cli(["generate", "-c", str(write(tmp, "empty.yaml", ""))]),
        "has no `generate:` section",
    ),
    case("pipeline-bad-config", stage("pipeline", {"pipelin": {}}), "pipelin", "unknown key"),
    case(
        "run-dir-on-a-filesystem-with-no-package",
        stage("generate", {"run_dir": "nosuchfs://bucket/run", "generate": {}}),
        "nosuchfs://bucket/run",
        "cannot open nosuchfs:// paths",
    ),
    case(
        "train-without-data-or-a-generate-section",
        stage("train", {"train": {"model": "tiny-random"}}),
        "train.data",
        "no training files",
    ),
    case(
        "serve-bad-config",
        lambda tmp: Cli(["serve", "-c", str(config_file(tmp, {"serve": {"port": 0}}))]),
        "serve.port",
    ),
    case(
        "eval-bad-config",
        eval_with({"eval": {"bootstrap": 5}}),
        "eval.bootstrap",
    ),
    case(
        "eval-baseline-not-evaluated",
        eval_with({"eval": {"baseline": "other"}}),
        "eval.baseline",
        "'other'",
    ),
]

SPEC_CASES = [
    case("spec-file-missing", spec_cmd_text(None), "spec.yaml", "file not found"),
    case("spec-invalid-yaml", spec_cmd_text("name: [unclosed\n"), "not valid YAML"),
    case("spec-root-is-a-list", spec_cmd_text("- a\n"), "expected a mapping, got list"),
    case("spec-empty-file", spec_cmd_text(""), "name", "Field required"),
    case(
        "spec-bad-policy-id",
        bad_spec(lambda s: policy(s).update(id="vio1")),
        "spec.path",
        "'vio1' must look like PREFIX-<number>",
    ),
    case(
        "spec-missing-policies",
        bad_spec(lambda s: s["categories"][0].pop("policies")),
        "categories.0.policies",
        "Field required",
    ),
    case(
        "spec-empty-policies",
        bad_spec(lambda s: s["categories"][0].update(policies=[])),
        "categories.0.policies",
        "at least 1 item",
    ),
    case(
        "spec-no-categories",
        bad_spec(lambda s: s.update(categories=[])),
        "categories",
        "at least 1 item",
    ),
    case(
        "spec-duplicate-policy-id",
        bad_spec(lambda s: policy(s, 0, 1).update(id=policy(s)["id"])),
        "duplicate policy id 'VIO-1'",
    ),
    case(
        "spec-duplicate-category-id",
        bad_spec(lambda s: s["categories"][1].update(id=s["categories"][0]["id"])),
        "duplicate category id 'violence'",
    ),
    case(
        "spec-reused-prefix",
        bad_spec(
            lambda s: (
                s["categories"][1].update(prefix="VIO"),
                [p.update(id=f"VIO-{9 + i}") for i, p in enumerate(s["categories"][1]["policies"])],
            )
        ),
        "reuses prefix 'VIO'",
    ),
    case(
        "spec-empty-rule", bad_spec(lambda s: policy(s).update(rule="  ")), "rule must not be empty"
    ),
    case(
        "spec-missing-rule",
        bad_spec(lambda s: policy(s).pop("rule")),
        "categories.0.policies.0.rule",
        "Field required",
    ),
    case(
        "spec-dangling-see-also",
        bad_spec(lambda s: policy(s).update(see_also=["ZZZ-9"])),
        "see_also names unknown policy 'ZZZ-9'",
    ),
    case(
        "spec-policy-id-wrong-prefix",
        bad_spec(lambda s: policy(s).update(id="ILL-99")),
        "'ILL-99' must start with the category prefix 'VIO-'",
    ),
    case(
        "spec-unknown-action",
        bad_spec(lambda s: policy(s).update(actions=["maybe"])),
        "categories.0.policies.0.actions.0",
        "'maybe'",
    ),
    case(
        "spec-unknown-key",
        bad_spec(lambda s: policy(s).update(severity="high")),
        "categories.0.policies.0.severity",
        "unknown key",
    ),
    case(
        "spec-uppercase-category-id",
        bad_spec(lambda s: s["categories"][0].update(id="Violence")),
        "categories.0.id",
        "'Violence'",
    ),
    case(
        "spec-missing-style",
        bad_spec(lambda s: s.pop("style")),
        "style",
        "Field required",
    ),
    case(
        "spec-example-empty-reasoning",
        bad_spec(
            lambda s: policy(s).update(
                examples=[{"prompt": "p", "reasoning": "", "answer": "a", "action": "refuse"}]
            )
        ),
        "categories.0.policies.0.examples.0.reasoning",
    ),
]

PROMPT_CASES = [
    case("prompts-invalid-json-line", prompt_rows(["{not json"]), "p.jsonl:1: invalid_json"),
    case(
        "prompts-no-text-field",
        prompt_rows([{"category": "violence"}]),
        "p.jsonl:1: missing_text",
    ),
    case(
        "prompts-blank-prompt",
        prompt_rows([{"prompt": "   ", "category": "violence"}]),
        "p.jsonl:1: missing_text",
    ),
    case(
        "prompts-prompt-not-a-string",
        prompt_rows([{"prompt": 3, "category": "violence"}]),
        "p.jsonl:1: wrong_type:prompt",
    ),
    case(
        "prompts-unknown-category",
        prompt_rows([{"prompt": "hi", "category": "weather"}]),
        "p.jsonl:1: unknown_category:weather",
    ),
    case(
        "prompts-no-category",
        prompt_rows([{"prompt": "hi"}]),
        "p.jsonl:1: wrong_type:category",
    ),
    case(
        "prompts-bad-ideal-action",
        prompt_rows([GOOD_ROW | {"ideal_action": "ignore"}]),
        "p.jsonl:1: invalid_ideal_action:'ignore'",
    ),
    case(
        "prompts-over-long",
        prompt_rows([GOOD_ROW | {"prompt": "x" * 40}], max_chars=16),
        "p.jsonl:1: oversized (40 chars > max_chars 16)",
    ),
    case(
        "prompts-last-message-not-user",
        prompt_rows(
            [{"messages": [*USER, {"role": "assistant", "content": "x"}], "category": "violence"}]
        ),
        "last message must be from the user",
    ),
    case(
        "prompts-unknown-role",
        prompt_rows([{"messages": [{"role": "robot", "content": "x"}], "category": "violence"}]),
        "role 'robot'",
    ),
    case(
        "prompts-messages-not-a-list",
        prompt_rows([{"messages": "hi", "category": "violence"}]),
        "p.jsonl:1: wrong_type:messages",
    ),
    case("prompts-row-not-an-object", prompt_rows(["[1, 2]"]), "p.jsonl:1: wrong_type:row"),
    case(
        "prompts-id-wrong-type",
        prompt_rows([GOOD_ROW | {"id": [1]}]),
        "p.jsonl:1: wrong_type:id",
    ),
    case("prompts-empty-file", prompt_rows([]), "prompts.sources.0", "holds no rows"),
    case(
        "prompts-unknown-format",
        prompt_rows([GOOD_ROW], name="p.txt"),
        "prompts.sources.0",
        "unknown format",
    ),
    case(
        "prompts-file-missing",
        lambda tmp: validate({"prompts": {"sources": [str(tmp / "nope.jsonl")]}})(tmp),
        "prompts.sources.0",
        "file not found",
    ),
]

SUITE_CASES = [
    case(
        "suite-bad-expected",
        suite_rows([GOOD_SUITE_ROW | {"expected": "ignore"}]),
        "line 1",
        "expected: bad value 'ignore'",
    ),
    case(
        "suite-missing-expected",
        suite_rows([{"id": "a", "prompt": "hi"}]),
        "expected: bad value None",
    ),
    case(
        "suite-duplicate-id",
        suite_rows([GOOD_SUITE_ROW, GOOD_SUITE_ROW]),
        "line 2: duplicate id 'a'",
    ),
    case("suite-empty", suite_rows([]), "the suite holds no rows"),
    case(
        "suite-tags-not-a-list",
        suite_rows([GOOD_SUITE_ROW | {"tags": "x"}]),
        "tags: expected a list of strings",
    ),
    case(
        "suite-eval-only-not-bool",
        suite_rows([GOOD_SUITE_ROW | {"eval_only": "yes"}]),
        "eval_only: expected true or false",
    ),
    case("suite-invalid-json", suite_rows(["{oops"]), "line 1: invalid JSON"),
    case(
        "suite-missing-id",
        suite_rows([{"prompt": "hi", "expected": "comply"}]),
        "id: expected a non-empty string",
    ),
    case("suite-file-missing", suite_rows(None), "suite.jsonl", "suite file not found"),
    case(
        "suite-template-not-a-string",
        suite_rows([GOOD_SUITE_ROW | {"template": 3}]),
        "id 'a': template",
        "must be strings",
    ),
    case(
        "suite-empty-category",
        suite_rows([GOOD_SUITE_ROW | {"category": ""}]),
        "category: expected a non-empty string",
    ),
    case(
        "suite-no-prompt",
        suite_rows([{"id": "a", "expected": "comply"}]),
        "id 'a': missing_text",
    ),
    case("suite-unknown-format", suite_rows([GOOD_SUITE_ROW], name="suite.txt"), "unknown format"),
]

FLAG_CASES = [
    case(
        "spec-bad-variant",
        cli("spec", "violence", "--spec", str(SPEC_PATH), "--variant", "both"),
        "--variant: bad value 'both'",
        "'rules'",
    ),
    case(
        "spec-unknown-category",
        cli("spec", "weather", "--spec", str(SPEC_PATH)),
        "category: bad value 'weather'",
        "violence",
    ),
    case("grade-input-missing", grade_rows(None), "--input: bad value", "file not found"),
    case(
        "grade-batch-size-zero", grade_rows([GOOD_GRADE_ROW], "--batch-size", "0"), "--batch-size"
    ),
    case("grade-invalid-json-row", grade_rows(["{oops"]), "in.jsonl:1: invalid JSON"),
    case(
        "grade-row-without-completion",
        grade_rows([{"prompt": "hi"}]),
        "in.jsonl:1: completion: expected a string",
    ),
    case(
        "grade-row-not-an-object",
        grade_rows(["[1]"]),
        "in.jsonl:1: expected a JSON object, got list",
    ),
    case("grade-unknown-format", grade_rows([GOOD_GRADE_ROW], name="in.txt"), "unknown format"),
    case(
        "grade-output-missing",
        lambda tmp: Cli(["grade", "--input", str(write(tmp, "in.jsonl", "{}\n"))]),
        "Missing option",
        "--output",
    ),
    case(
        "suites-build-unknown-name",
        lambda tmp: Cli(
            ["suites", "build", "nope", "--out", str(tmp / "s.jsonl")], [tmp / "s.jsonl"]
        ),
        "bad name 'nope'",
        "strongreject",
    ),
    case(
        "config-show-unknown-section",
        cli("config", "show", "nope"),
        "unknown config section 'nope'",
        "generate.teacher",
    ),
    case("serve-bad-model-name", serve("--model", "bad name=tiny-random"), "must be 1-64 letters"),
    case("serve-port-out-of-range", serve("--model", "x/y", "--port", "70000"), "port", "70000"),
    case(
        "serve-port-not-a-number",
        serve("--model", "x/y", "--port", "abc"),
        "--port",
        "Invalid value",
    ),
    case(
        "serve-model-name-twice",
        serve("--model", "a=x/y", "--model", "a=x/z"),
        "the name 'a' is used twice",
    ),
    case("serve-empty-model-ref", serve("--model", "a="), "empty model reference"),
    case("serve-no-model", serve(), "give at least one --model"),
    case("serve-empty-api-key-env", serve("--model", "x/y", "--api-key-env", ""), "api_key_env"),
    case(
        "serve-missing-local-model",
        serve("--model", "a=./no/such/model"),
        "model path './no/such/model' does not exist",
    ),
    case(
        "serve-no-api-key",
        serve("--model", "a=org/some-model"),
        "DELIBERATE_RAY_API_KEY, which is not set or empty",
        "--no-auth",
    ),
    case(
        "eval-limit-zero",
        suite_rows([GOOD_SUITE_ROW], "--limit", "0"),
        "--limit",
    ),
    case(
        "eval-no-model",
        lambda tmp: Cli(
            ["eval", "--endpoint", DEAD_ENDPOINT, "--out", str(tmp / "out")], [tmp / "out"]
        ),
        "Missing option",
        "--model",
    ),
    case("train-no-config", cli("train"), "Missing option", "--config"),
    case("prepare-model-missing-path", cli("prepare-model", "./nonexistent"), "does not exist"),
    case(
        "prepare-model-unknown-embedded",
        cli("prepare-model", "embedded:nope"),
        "unknown embedded model 'embedded:nope'",
    ),
    case("validate-no-argument", cli("validate"), "Missing argument"),
    case("unknown-command", cli("frobnicate"), "No such command"),
]

HTTP_CASES = [
    case("http-malformed-json", chat(b'{"model": "tiny", "messages": ['), "not valid JSON"),
    case("http-not-utf8", chat(b"\xff\xfe\x00"), "not valid JSON"),
    case("http-body-is-a-list", chat(b'["tiny"]'), "must be a JSON object, got list"),
    case("http-missing-messages", chat({"model": SERVED}), "messages", "Field required"),
    case("http-empty-messages", chat(req(messages=[])), "messages"),
    case(
        "http-no-user-turn",
        chat(req(messages=[{"role": "system", "content": "x"}])),
        "role 'user'",
    ),
    case(
        "http-unknown-role",
        chat(req(messages=[{"role": "tool", "content": "x"}])),
        "messages.0.role",
    ),
    case(
        "http-content-not-a-string",
        chat(req(messages=[{"role": "user", "content": 5}])),
        "messages.0.content",
    ),
    case("http-message-not-an-object", chat(req(messages=["hi"])), "messages.0"),
    case("http-missing-model", chat({"messages": USER}), "model", "Field required"),
    case(
        "http-unknown-model",
        chat(req(model="gpt-17"), status=404),
        "model 'gpt-17' does not exist",
        SERVED,
    ),
    case("http-max-tokens-string", chat(req(max_tokens="5")), "max_tokens"),
    case("http-max-tokens-zero", chat(req(max_tokens=0)), "max_tokens"),
    case(
        "http-max-tokens-over-limit",
        chat(req(max_tokens=LIMIT + 1)),
        f"max_tokens: {LIMIT + 1} exceeds this server's limit of {LIMIT}",
    ),
    case("http-temperature-too-high", chat(req(temperature=3)), "temperature"),
    case(
        "http-temperature-nan",
        chat(
            b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
            b'"temperature": NaN}'
        ),
        "temperature",
    ),
    case("http-empty-model-name", chat(req(model="")), "model", "at least 1 character"),
    case("http-top-p-zero", chat(req(top_p=0)), "top_p"),
    case("http-repetition-penalty-zero", chat(req(repetition_penalty=0)), "repetition_penalty"),
    case("http-n-too-large", chat(req(n=99)), "n:"),
    case("http-n-is-a-bool", chat(req(n=True)), "n:"),
    case("http-seed-string", chat(req(seed="1")), "seed"),
    case("http-too-many-stops", chat(req(stop=["a", "b", "c", "d", "e"])), "stop"),
    case("http-empty-stop", chat(req(stop=[""])), "stop sequences must be non-empty"),
    case("http-stream", chat(req(stream=True)), "streaming is not supported"),
    case(
        "http-body-too-large",
        chat(b'{"x": "' + b"a" * (1 << 20) + b'"}', status=413),
        "exceeds",
    ),
    case("http-no-api-key", chat(req(), 401, headers={}), "missing or invalid API key"),
    case(
        "http-wrong-api-key",
        chat(req(), 401, headers={"Authorization": "Bearer wrong"}),
        "missing or invalid API key",
    ),
    case(
        "http-basic-auth",
        chat(req(), 401, headers={"Authorization": f"Basic {KEY}"}),
        "missing or invalid API key",
    ),
    case(
        "http-models-without-key",
        lambda tmp: Http("GET", "/v1/models", status=401, headers={}),
        "missing or invalid API key",
    ),
    case(
        "http-unknown-route",
        lambda tmp: Http("GET", "/v1/nothing", status=404),
        "/v1/nothing",
        "Not Found",
    ),
    case(
        "http-wrong-method",
        lambda tmp: Http("GET", "/v1/chat/completions", status=405),
        "Method Not Allowed",
    ),
]


def write_bytes(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def folder(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    return path


# Inputs that crashed with a traceback, exited 0 or wrote output before their fixes.
FIXED_CASES = [
    case(
        "config-path-is-a-directory",
        lambda tmp: Cli(["validate", str(folder(tmp, "dir.yaml"))]),
        "dir.yaml",
        "not a file",
    ),
    case(
        "spec-path-is-a-directory",
        lambda tmp: Cli(["spec", "violence", "--spec", str(folder(tmp, "specdir"))]),
        "specdir",
        "not a file",
    ),
    case(
        "config-not-utf8",
        lambda tmp: Cli(["validate", str(write_bytes(tmp, "c.yaml", b"run_dir: \xff\xfe\n"))]),
        "c.yaml",
        "not UTF-8",
    ),
    case(
        "suite-not-utf8",
        lambda tmp: Cli(
            [
                "eval",
                "--endpoint",
                DEAD_ENDPOINT,
                "--model",
                "m",
                "--out",
                str(tmp / "out"),
                "--suite",
                str(write_bytes(tmp, "s.jsonl", b'{"id": "\xff"}\n')),
            ],
            [tmp / "out"],
        ),
        "s.jsonl",
        "not UTF-8",
    ),  # fmt: skip
    case(
        "suites-check-prompts-missing",
        lambda tmp: Cli(["suites", "check", "--prompts", str(tmp / "missing.jsonl")]),
        "file not found",
        "missing.jsonl",
    ),
    case(
        "suites-check-prompts-unknown-format",
        lambda tmp: Cli(
            ["suites", "check", "--prompts", str(write(tmp, "p.txt", '{"prompt": "x"}\n'))]
        ),
        "p.txt",
    ),
    case(
        "suites-check-suite-missing",
        lambda tmp: Cli(
            ["suites", "check", "--prompts", str(SEED), "--suite", str(tmp / "nosuite.jsonl")]
        ),
        "file not found",
        "nosuite.jsonl",
    ),
    case(
        "pipeline-missing-sections-writes-nothing",
        stage("pipeline", {"generate": None}),
        "missing section",
    ),
    case("grade-empty-input", grade_rows([]), "no rows to grade"),
    case(
        "grade-output-folder-missing",
        lambda tmp: Cli(
            [
                "grade",
                "--input",
                str(write(tmp, "in.jsonl", json.dumps(GOOD_GRADE_ROW) + "\n")),
                "--output",
                str(tmp / "no" / "such" / "out.jsonl"),
            ],
        ),
        "--output",
        "folder does not exist",
    ),  # fmt: skip
    case(
        "grade-input-is-a-directory",
        lambda tmp: Cli(
            ["grade", "--input", str(folder(tmp, "x.jsonl")), "--output", str(tmp / "o.jsonl")],
            [tmp / "o.jsonl"],
        ),
        "--input",
        "not a file",
    ),
    case("http-body-nested-too-deeply", chat(b"[" * 100000), "nested too deeply"),
]

CASES = (
    CONFIG_CASES + SPEC_CASES + PROMPT_CASES + SUITE_CASES + FLAG_CASES + HTTP_CASES + FIXED_CASES
)


# ------------------------------------------------------------------ running a case


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Any case that got as far as starting Ray fails loudly instead."""
    import ray

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a bad-input case reached ray.init()")

    running = ray.is_initialized()  # an earlier test file's session may hold one
    monkeypatch.setattr(ray, "init", refuse)
    yield
    assert ray.is_initialized() == running


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_cli(tmp: Path, c: Cli, expect: tuple[str, ...], monkeypatch) -> None:
    for var, value in c.env.items():
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    before = files_under(tmp)
    result = runner.invoke(app, c.args)
    out = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {out}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in out, out
    for text in expect:
        assert text in out, f"{text!r} not in: {out}"
    for path in c.outputs:
        assert not path.exists(), f"{path} was written"
    assert files_under(tmp) == before, f"new files: {files_under(tmp) - before}"


@pytest.fixture
def http_client(monkeypatch):
    """The Serve app's FastAPI router with a stub replica serving SERVED (no model loaded):
    Serve's class-based view asks the replica context for the instance, so that is stubbed.
    (This leans on how ray.serve.ingress finds `self`; tests/test_serve.py covers the real
    deployment.)"""
    from ray import serve
    from starlette.testclient import TestClient

    from deliberate_ray.serve import app as serve_app
    from deliberate_ray.serve.protocol import key_digest

    class Replica:  # the attributes OpenAIServer.__init__ sets, without loading a model
        _authorize = serve_app.OpenAIServer.func_or_class._authorize
        models = {SERVED: object()}  # never asked: each case is refused before
        key_sha256 = key_digest(KEY)
        max_tokens_limit = LIMIT
        default_max_tokens = 16

    class Context:
        servable_object = Replica()

    monkeypatch.setattr(serve, "get_replica_context", lambda: Context)
    with TestClient(serve_app.api, raise_server_exceptions=False) as client:
        yield client


def run_http(client: Any, h: Http, expect: tuple[str, ...]) -> None:
    if isinstance(h.body, bytes):
        kwargs: dict[str, Any] = {"content": h.body}
    elif h.body is not None:
        kwargs = {"content": json.dumps(h.body)}
    else:
        kwargs = {}
    r = client.request(h.method, h.path, headers=h.headers, **kwargs)
    assert r.status_code == h.status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert "Traceback" not in r.text, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error", err
    for text in expect:
        assert text in err["message"], f"{text!r} not in: {err['message']}"


@pytest.mark.parametrize(("build", "expect"), CASES)
def test_bad_input_is_refused_clearly(build, expect, tmp_path, monkeypatch, request):
    c = build(tmp_path)
    if isinstance(c, Http):
        run_http(request.getfixturevalue("http_client"), c, expect)
    else:
        run_cli(tmp_path, c, expect, monkeypatch)


def test_the_census_is_big_and_spread():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 55
    for area in (CONFIG_CASES, SPEC_CASES, PROMPT_CASES, SUITE_CASES, FLAG_CASES, HTTP_CASES):
        assert len(area) >= 5
