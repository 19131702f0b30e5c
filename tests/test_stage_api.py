"""One stage signature, typed results, cross-section defaults resolved once."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest

from deliberate_ray.config import Config, ConfigError, resolve_run
from deliberate_ray.results import StageResult

ROOT = Path(__file__).resolve().parents[1]


def stage_functions():
    from deliberate_ray.evals import run_eval
    from deliberate_ray.generate import run_generate
    from deliberate_ray.msm import run_docs
    from deliberate_ray.rl import run_rl
    from deliberate_ray.train import run_train

    return [run_generate, run_docs, run_train, run_rl, run_eval]


@pytest.mark.parametrize("fn", stage_functions(), ids=lambda f: f.__name__)
def test_every_stage_takes_its_section_and_the_run_dir_and_returns_a_typed_result(fn):
    params = list(inspect.signature(fn).parameters.values())
    assert [p.name for p in params[:2]] == ["section", "run_dir"]
    assert all(p.kind is p.KEYWORD_ONLY for p in params[2:])  # shared inputs, options
    hints = typing.get_type_hints(fn)
    section = hints[params[0].name]
    assert section.__name__.endswith("Config") and section is not Config  # a section, not all
    assert hints["run_dir"] is str
    assert issubclass(hints["return"], StageResult)


def test_resolve_run_fills_cross_section_defaults_once(tmp_path):
    cfg = Config.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "spec": {"path": str(ROOT / "specs" / "default.yaml"), "variant": "rules"},
            "generate": {},
            "train": {},
            "eval": {"max_tokens": 8},
            "rl": {},
        }
    )
    r = resolve_run(cfg)
    run = str(tmp_path / "run")
    assert r.run_dir == run
    assert r.generate.output_dir == f"{run}/generate"
    assert r.train.output_dir == f"{run}/train"
    assert r.train.data == [f"{run}/generate/tuples"]  # the run's own tuples
    assert (r.eval.output_dir, r.eval.spec, r.eval.spec_variant) == (
        f"{run}/eval",
        str(ROOT / "specs" / "default.yaml"),
        "rules",
    )
    assert r.rl.output_dir == f"{run}/rl"
    assert resolve_run(r) == r  # once is enough: resolving again changes nothing


def test_resolve_run_keeps_what_a_config_sets_and_keeps_uris(tmp_path):
    cfg = Config.model_validate(
        {
            "run_dir": "s3://bucket/runs/x",
            "generate": {"output_dir": "s3://other/gen"},
            "train": {"data": ["mine.jsonl"]},
            "eval": {"spec": "specs/other.yaml", "spec_variant": "values"},
        }
    )
    r = resolve_run(cfg)
    assert r.run_dir == "s3://bucket/runs/x" and r.generate.output_dir == "s3://other/gen"
    assert r.train.data == ["mine.jsonl"] and r.train.output_dir == "s3://bucket/runs/x/train"
    assert (r.eval.spec, r.eval.spec_variant) == ("specs/other.yaml", "values")


def test_run_stage_names_a_missing_section_and_an_unknown_stage(tmp_path):
    from deliberate_ray.pipeline import run_stage

    with pytest.raises(ConfigError, match="train: missing section"):
        run_stage(Config(run_dir=str(tmp_path)), "train")
    with pytest.raises(ConfigError, match="unknown stage 'serve'"):
        run_stage(Config(run_dir=str(tmp_path), serve={}), "serve")
