"""`deliberate-ray validate`: broken configs, specs and prompt files give field-path errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from deliberate_ray.cli import app

ROOT = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((ROOT / "specs" / "default.yaml").read_text())
runner = CliRunner()


def write_config(tmp: Path, cfg: dict, spec: dict | None = None, prompts: list | None = None):
    if spec is not None:
        (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
        cfg.setdefault("spec", {})["path"] = str(tmp / "spec.yaml")
    if prompts is not None:
        lines = [p if isinstance(p, str) else json.dumps(p) for p in prompts]
        (tmp / "p.jsonl").write_text("\n".join(lines) + "\n")
        cfg.setdefault("prompts", {})["sources"] = [str(tmp / "p.jsonl")]
    cfg.setdefault("spec", {}).setdefault("path", str(ROOT / "specs" / "default.yaml"))
    cfg.setdefault("prompts", {}).setdefault("sources", [str(ROOT / "data/prompts/seed.jsonl")])
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_validate(path: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["validate", str(path)])
    return result.exit_code, result.output


def spec_with(mutate) -> dict:
    spec = json.loads(json.dumps(SPEC))
    mutate(spec)
    return spec


def test_shipped_configs_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        code, out = run_validate(path)
        assert code == 0, out


GOOD = {"prompt": "How do I kill a Python process?", "category": "violence"}

BROKEN_CASES = {
    "unknown top-level key": ({"runn_dir": "x"}, None, None, ["runn_dir", "unknown key"]),
    "wrong type": ({"prompts": {"max_chars": "lots"}}, None, None, ["prompts.max_chars", "'lots'"]),
    "bad literal": ({"spec": {"variant": "both"}}, None, None, ["spec.variant", "'both'", "rules"]),
    "out of range": (
        {"generate": {"teacher": {"samples_per_prompt": 0}}},
        None,
        None,
        ["generate.teacher.samples_per_prompt", "0"],
    ),
    "http engine without url": (
        {"generate": {"teacher": {"engine": {"kind": "http"}}}},
        None,
        None,
        ["generate.teacher.engine", "base_url"],
    ),
    "autoscaling max < min": (
        {"serve": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}},
        None,
        None,
        ["serve.autoscaling", "max_replicas"],
    ),
    "duplicate arm names": (
        {"pipeline": {"arms": [{"name": "a"}, {"name": "a"}]}},
        None,
        None,
        ["pipeline.arms", "unique"],
    ),
    "missing prompt file": (
        {"prompts": {"sources": ["/nonexistent/p.jsonl"]}},
        None,
        None,
        ["prompts.sources.0", "file not found"],
    ),
    "unknown prompt format": (
        {"prompts": {"sources": [str(ROOT / "pyproject.toml")]}},
        None,
        None,
        ["prompts.sources.0", "unknown format"],
    ),
    "bad prompt rows": (
        {},
        None,
        [
            GOOD,
            "{not json",
            {"prompt": 3, "category": "violence"},
            {"prompt": "hi", "category": "weather"},
            {"prompt": "hi", "category": "general", "ideal_action": "ignore"},
        ],
        [
            "p.jsonl:2: invalid_json",
            "p.jsonl:3: wrong_type:prompt",
            "p.jsonl:4: unknown_category:weather",
            "p.jsonl:5: invalid_ideal_action",
        ],
    ),
    "duplicate policy id": (
        {},
        spec_with(
            lambda s: s["categories"][0]["policies"].append(
                dict(s["categories"][0]["policies"][1], id=s["categories"][0]["policies"][0]["id"])
            )
        ),
        None,
        ["duplicate policy id", "VIO-1"],
    ),
    "missing spec file": (
        {"spec": {"path": "/nonexistent/spec.yaml"}},
        None,
        None,
        ["spec.path", "not found"],
    ),
    "empty rule": (
        {},
        spec_with(lambda s: s["categories"][0]["policies"][0].update(rule="  ")),
        None,
        ["rule", "must not be empty"],
    ),
    "dangling see_also": (
        {},
        spec_with(lambda s: s["categories"][0]["policies"][0].update(see_also=["ZZZ-9"])),
        None,
        ["see_also", "ZZZ-9"],
    ),
    "policy id with wrong prefix": (
        {},
        spec_with(lambda s: s["categories"][0]["policies"][0].update(id="ILL-99")),
        None,
        ["ILL-99", "prefix"],
    ),
    "unknown action in spec": (
        {},
        spec_with(lambda s: s["categories"][0]["policies"][0].update(actions=["maybe"])),
        None,
        ["actions", "'maybe'"],
    ),
    "duplicate category": (
        {},
        spec_with(lambda s: s["categories"].append(dict(s["categories"][0]))),
        None,
        ["duplicate category id", "violence"],
    ),
    "spec not a mapping": ({}, ["just", "a", "list"], None, ["expected a mapping"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CASES))
def test_broken_inputs_are_reported(tmp_path: Path, case: str):
    cfg, spec, prompts, expected = BROKEN_CASES[case]
    path = write_config(tmp_path, json.loads(json.dumps(cfg)), spec, prompts)
    code, out = run_validate(path)
    assert code == 2, out
    for fragment in expected:
        assert fragment in out, f"{fragment!r} not in:\n{out}"
    assert "Traceback" not in out


def test_every_error_is_listed(tmp_path: Path):
    cfg = {"runn_dir": "x", "prompts": {"max_chars": -1}, "spec": {"variant": "x"}}
    code, out = run_validate(write_config(tmp_path, cfg))
    assert code == 2
    assert "3 error(s)" in out
