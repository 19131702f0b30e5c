"""The behaviour spec: load, validate and render `spec_for(category, variant)`.

The full detailed policies of all categories do not fit one context, so the teacher and the
judge see the overview, the style guides, one-line summaries of every category and the
detailed policies of the prompt's own category only (docs/spec-format.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from deliberate_ray.config import Action, ConfigError, StrictModel, parse_model, read_yaml

Variant = Literal["rules", "values"]
VARIANTS: tuple[str, ...] = ("rules", "values")
POLICY_ID = re.compile(r"^([A-Z][A-Z0-9]*)-(\d+)$")
# Anything that looks like a policy id in free text (used to find citations in a CoT).
CITATION = re.compile(r"\b([A-Z][A-Z0-9]{1,5}-\d{1,3})\b")


class Example(StrictModel):
    prompt: str = Field(min_length=1)
    reasoning: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    action: Action


class Policy(StrictModel):
    id: str
    rule: str
    rationale: str = Field(min_length=1)
    actions: list[Action] = Field(min_length=1)
    see_also: list[str] = Field(default_factory=list)
    examples: list[Example] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not POLICY_ID.match(v):
            raise ValueError(f"policy id {v!r} must look like PREFIX-<number>, e.g. VIO-2")
        return v

    @field_validator("rule")
    @classmethod
    def _rule_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("rule must not be empty")
        return v.strip()


class Category(StrictModel):
    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    prefix: str = Field(pattern=r"^[A-Z][A-Z0-9]*$")
    title: str = Field(min_length=1)
    summary: str = Field(min_length=1)
    policies: list[Policy] = Field(min_length=1)

    @model_validator(mode="after")
    def _ids_match_prefix(self) -> Category:
        for i, p in enumerate(self.policies):
            if not p.id.startswith(self.prefix + "-"):
                raise ValueError(
                    f"policies[{i}].id {p.id!r} must start with the category prefix "
                    f"{self.prefix + '-'!r}"
                )
        return self


class StyleGuides(StrictModel):
    hard_refusal: str = Field(min_length=1)
    safe_completion: str = Field(min_length=1)
    full_compliance: str = Field(min_length=1)


class Spec(StrictModel):
    name: str
    version: str
    overview: str = Field(min_length=1)
    style: StyleGuides
    categories: list[Category] = Field(min_length=1)

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, v: object) -> object:
        return str(v) if isinstance(v, int | float) else v

    @model_validator(mode="after")
    def _cross_checks(self) -> Spec:
        errors: list[str] = []
        seen_cat: set[str] = set()
        seen_prefix: dict[str, str] = {}
        seen_policy: set[str] = set()
        for c in self.categories:
            if c.id in seen_cat:
                errors.append(f"duplicate category id {c.id!r}")
            seen_cat.add(c.id)
            if c.prefix in seen_prefix:
                errors.append(
                    f"category {c.id!r} reuses prefix {c.prefix!r} of {seen_prefix[c.prefix]!r}"
                )
            seen_prefix[c.prefix] = c.id
            for p in c.policies:
                if p.id in seen_policy:
                    errors.append(f"duplicate policy id {p.id!r}")
                seen_policy.add(p.id)
        for c in self.categories:
            for p in c.policies:
                for ref in p.see_also:
                    if ref not in seen_policy:
                        errors.append(f"policy {p.id}: see_also names unknown policy {ref!r}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    # ------------------------------------------------------------ lookups

    @cached_property
    def category_ids(self) -> list[str]:
        return [c.id for c in self.categories]

    def category(self, category_id: str) -> Category:
        for c in self.categories:
            if c.id == category_id:
                return c
        raise KeyError(f"unknown category {category_id!r}; the spec has: {self.category_ids}")

    def policy_ids(self, category_id: str | None = None) -> set[str]:
        cats = self.categories if category_id is None else [self.category(category_id)]
        return {p.id for c in cats for p in c.policies}

    def category_of_policy(self, policy_id: str) -> str | None:
        for c in self.categories:
            if any(p.id == policy_id for p in c.policies):
                return c.id
        return None

    def examples(self, category_id: str) -> list[tuple[Policy, Example]]:
        return [(p, e) for p in self.category(category_id).policies for e in p.examples]

    # ------------------------------------------------------------ rendering

    @cached_property
    def sha(self) -> str:
        """Content hash: stable across YAML formatting and key order, changes with any text."""
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def render(self, category_id: str, variant: Variant = "values") -> str:
        """Overview + style guides + all category summaries + this category's detailed policy."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown spec variant {variant!r}; allowed: {list(VARIANTS)}")
        own = self.category(category_id)
        lines = [f"# {self.name} (v{self.version})", "", "## Overview", fold(self.overview), ""]
        lines += ["## Style guides"]
        lines += [f"- Hard refusal: {fold(self.style.hard_refusal)}"]
        lines += [f"- Safe completion: {fold(self.style.safe_completion)}"]
        lines += [f"- Full compliance: {fold(self.style.full_compliance)}", ""]
        lines += ["## Categories"]
        lines += [f"- {c.title} ({c.prefix}): {fold(c.summary)}" for c in self.categories]
        lines += ["", f"## Detailed policy: {own.title}"]
        for p in own.policies:
            lines.append(f"- {p.id}: {fold(p.rule)}")
            if variant == "values":
                lines.append(f"  Why: {fold(p.rationale)}")
            lines.append(f"  Ideal action: {' or '.join(p.actions)}")
        return "\n".join(lines).strip() + "\n"


def fold(text: str) -> str:
    """Join hard-wrapped lines of a YAML block scalar; keep blank-line paragraph breaks."""
    paras = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(" ".join(p.split()) for p in paras)


def spec_for(spec: Spec, category: str, variant: Variant = "values") -> str:
    return spec.render(category, variant)


def load_spec(path: str | Path) -> Spec:
    """Load and validate a spec file; raises ConfigError naming every problem."""
    return parse_model(read_yaml(path), Spec, str(path))


def check_spec_coverage(spec: Spec) -> list[str]:
    """Softer checks that a *shipped* spec must pass: examples per category, one helpful."""
    problems = []
    for c in spec.categories:
        examples = [e for p in c.policies for e in p.examples]
        if len(examples) < 2:
            problems.append(f"category {c.id!r} has {len(examples)} worked example(s); needs >= 2")
        if not any(e.action != "refuse" for e in examples):
            problems.append(f"category {c.id!r} has no worked example where the answer helps")
        if len(c.policies) < 2:
            problems.append(f"category {c.id!r} has {len(c.policies)} policy; needs >= 2")
    return problems


__all__ = [
    "CITATION",
    "Category",
    "ConfigError",
    "Example",
    "Policy",
    "Spec",
    "check_spec_coverage",
    "load_spec",
    "spec_for",
]
