"""`deliberate-ray config show`: every config field documented where it is defined, and the
reference printed from the models themselves."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from deliberate_ray.cli import app
from deliberate_ray.config import Config, EvalConfig, SamplingConfig
from deliberate_ray.config_show import describe, nested_model, sections, type_name

runner = CliRunner()


def reachable_models(root: type[BaseModel] = Config) -> list[type[BaseModel]]:
    """Every model reachable from `root` through its fields (sections, lists of sections)."""
    seen: list[type[BaseModel]] = []
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        todo += [m[0] for f in cls.model_fields.values() if (m := nested_model(f.annotation))]
    return seen


def undocumented(root: type[BaseModel]) -> list[str]:
    return [
        f"{cls.__name__}.{name}"
        for cls in reachable_models(root)
        for name, info in cls.model_fields.items()
        if not (info.description or "").strip()
    ]


def test_every_field_has_a_description():
    assert len(reachable_models()) >= 15  # Config, its sections and their nested models
    missing = undocumented(Config)
    assert not missing, f"fields without a description: {missing}"


def test_the_walk_finds_a_missing_description():
    class Inner(BaseModel):
        bare: int = 0

    class Outer(BaseModel):
        items: list[Inner] = Field(default_factory=list, description="documented")
        blank: str = Field(default="", description="  ")

    assert undocumented(Outer) == ["Outer.blank", "Inner.bare"]


def test_show_eval_section():
    result = runner.invoke(app, ["config", "show", "eval"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "eval.max_tokens" in out
    block = out.split("eval.max_tokens", 1)[1].split("\n\n", 1)[0]
    assert "type: int" in block
    assert "default: 256" in block
    assert "bounds: >= 1" in block
    assert EvalConfig.model_fields["max_tokens"].description.split()[0] in block
    # nested sections, readable types, evaluated default factories
    assert "eval.judge.sampling.max_tokens" in out
    assert "type: rules | values" in out
    assert "type: list[classifier | rules]" in out
    assert '["classifier", "rules"]' in out
    assert "type: str | None" in out


def test_nested_defaults_are_the_ones_in_effect():
    out = describe("generate.judge.llm.sampling")
    block = out.split("generate.judge.llm.sampling.max_tokens", 1)[1].split("\n\n", 1)[0]
    assert "default: 128" in block  # the judge's own factory, not SamplingConfig's 256
    assert "<= 131072" in block


def test_unknown_section_exits_2_naming_the_allowed_ones():
    result = runner.invoke(app, ["config", "show", "nosuch"])
    assert result.exit_code == 2
    assert "error:" in result.output and "'nosuch'" in result.output
    for name in ("generate", "generate.teacher", "train", "serve", "eval", "pipeline"):
        assert name in result.output
    with pytest.raises(ValueError, match="allowed: spec, prompts, generate"):
        describe("eval.nosuch")


def test_show_everything_lists_every_top_level_section():
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    for name, info in Config.model_fields.items():
        assert f"\n  {name}\n" in result.output, name
        if nested_model(info.annotation):
            assert f"[{name}]" in result.output, name
    assert "pipeline.arms[].name" in result.output
    assert "default: required" in result.output


def test_every_section_renders():
    for section in sections():
        assert describe(section).startswith(section + "\n")


def test_type_names():
    fields = SamplingConfig.model_fields
    assert type_name(fields["stop"].annotation) == "list[str]"
    assert type_name(fields["seed"].annotation) == "int | None"
    assert type_name(Config.model_fields["train"].annotation) == "TrainConfig | None"


def test_override_revalidates_and_names_the_field_path():
    import pytest

    from deliberate_ray.config import ConfigError, EvalConfig, override

    cfg = override(EvalConfig(), "eval", limit=5, api_key_env=None)  # None: left as it is
    assert cfg.limit == 5 and cfg.api_key_env is None
    with pytest.raises(ConfigError, match=r"eval\.limit: bad value 0"):
        override(EvalConfig(), "eval", limit=0)
    with pytest.raises(ConfigError, match=r"eval\.scorers"):
        override(EvalConfig(), "eval", scorers=["helpful"])  # validators run too
