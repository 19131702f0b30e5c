"""Rebuild data/eval/jailbreak.jsonl: every harmful prompt of the in-distribution suite
inside every template of data/eval/jailbreak_templates.yaml (deterministic)."""

from __future__ import annotations

import json
from pathlib import Path

from deliberate_ray.evals.suites import jailbreak_rows, load_templates

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "data" / "eval" / "in_distribution.jsonl"
TEMPLATES = ROOT / "data" / "eval" / "jailbreak_templates.yaml"
OUT = ROOT / "data" / "eval" / "jailbreak.jsonl"


def build() -> str:
    source = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line]
    rows = jailbreak_rows(source, load_templates(TEMPLATES))
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    text = build()
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({text.count(chr(10))} rows)")
