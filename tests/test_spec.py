"""The spec: loading, rendering spec_for(category, variant), variants and hash stability."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deliberate_ray.spec import Spec, check_spec_coverage, load_spec, spec_for

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {
    "violence",
    "illicit",
    "self_harm",
    "harassment_hate",
    "extremism",
    "sexual",
    "regulated_advice",
    "privacy",
    "general",
}


def test_default_spec_covers_required_categories(spec: Spec):
    assert REQUIRED <= set(spec.category_ids)
    assert check_spec_coverage(spec) == []


@pytest.mark.parametrize("category", sorted(REQUIRED))
def test_spec_for_contains_overview_style_and_own_policies_only(spec: Spec, category: str):
    text = spec_for(spec, category, "values")
    assert " ".join(spec.overview.split())[:80] in text
    for guide in (spec.style.hard_refusal, spec.style.safe_completion, spec.style.full_compliance):
        assert " ".join(guide.split())[:60] in text
    own = spec.category(category)
    for p in own.policies:
        assert f"- {p.id}: " in text
        assert " ".join(p.rule.split()) in text
    for other in spec.categories:
        if other.id == category:
            continue
        for p in other.policies:
            assert f"- {p.id}: " not in text, f"{p.id} leaked into {category}"
            assert " ".join(p.rule.split()) not in text
        assert other.title in text  # summaries of every category stay


def test_variants_differ_only_by_rationales(spec: Spec):
    cat = spec.category("violence")
    rules = spec_for(spec, "violence", "rules")
    values = spec_for(spec, "violence", "values")
    for p in cat.policies:
        rationale = " ".join(p.rationale.split())
        assert rationale in values
        assert rationale not in rules
    stripped = "\n".join(line for line in values.splitlines() if not line.startswith("  Why: "))
    assert stripped == rules.rstrip("\n")
    with pytest.raises(ValueError, match="variant"):
        spec.render("violence", "both")  # type: ignore[arg-type]


def test_unknown_category_is_a_clear_error(spec: Spec):
    with pytest.raises(KeyError, match="unknown category 'weather'"):
        spec_for(spec, "weather")


def test_sha_stable_across_formatting_and_changes_with_content(tmp_path: Path, spec: Spec):
    data = yaml.safe_load((ROOT / "specs" / "default.yaml").read_text())
    reordered = tmp_path / "reordered.yaml"
    reordered.write_text(yaml.safe_dump(data, sort_keys=True, width=60, indent=4))
    assert load_spec(reordered).sha == spec.sha
    assert load_spec(ROOT / "specs" / "default.yaml").sha == spec.sha
    data["categories"][0]["policies"][0]["rule"] += " Also this."
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    assert load_spec(changed).sha != spec.sha


def test_examples_cite_their_own_category(spec: Spec):
    from deliberate_ray.spec import CITATION

    for c in spec.categories:
        for policy, ex in spec.examples(c.id):
            cited = set(CITATION.findall(ex.reasoning))
            assert cited & spec.policy_ids(c.id), (c.id, ex.reasoning)
            assert policy.id.startswith(c.prefix)
