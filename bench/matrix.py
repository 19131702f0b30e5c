"""The four-arm matrix from an empty run directory, timed: wall time per stage and in all,
the matrix table and the docs corpus card, kept under bench/results/.

    python bench/matrix.py                 # configs/matrix.yaml into a fresh run_dir
    python bench/matrix.py --sweep         # then configs/matrix-sweep.yaml --force on it

Writes bench/results/matrix.json (stage times, totals, the matrix contrasts), and copies
the run's report.md and the docs card to bench/results/matrix_report.md and
matrix_docs_card.md; with --sweep also the sweep run's report and chart
(matrix_sweep_report.md, matrix_sweep.png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def config_with_run_dir(name: str, run_dir: Path, out: Path) -> Path:
    data = yaml.safe_load((ROOT / "configs" / name).read_text())
    data["run_dir"] = str(run_dir)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def run(config: Path, force: bool, log: Path) -> float:
    cmd = [sys.executable, "-m", "deliberate_ray.cli", "pipeline", "--config", str(config)]
    if force:
        cmd.append("--force")
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return wall


def stage_times(run_dir: Path) -> dict[str, float]:
    out = {}
    for f in sorted((run_dir / "stages").glob("*.json")):
        out[f.stem] = json.loads(f.read_text()).get("wall_s")
    return out


def contrasts(run_dir: Path, config: Path) -> list[dict]:
    from deliberate_ray.config import load_config
    from deliberate_ray.matrix import MATRIX_METRICS, contrasts, oriented

    cfg = load_config(config)
    ev = json.loads((run_dir / "eval" / "metrics.json").read_text())
    rows = []
    for suite in ev["suites"]:
        paired = ev["paired"].get(suite, [])
        for label, a, b in contrasts(cfg.pipeline, "base"):
            for metric in MATRIX_METRICS:
                d = oriented(paired, a, b, metric)
                if d is not None:
                    rows.append({"suite": suite, "contrast": label} | d)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "matrix-bench"))
    ap.add_argument("--sweep", action="store_true", help="then run the sweep config on it")
    ap.add_argument("--keep", action="store_true", help="reuse an existing run_dir")
    ap.add_argument(
        "--sweep-only", action="store_true", help="only the sweep, on an existing matrix run_dir"
    )
    args = ap.parse_args()
    run_dir = Path(args.run_dir).resolve()
    if run_dir.exists() and not (args.keep or args.sweep_only):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "matrix.json"
    old: dict = json.loads(out.read_text()) if out.exists() else {}
    if "sweep_wall_s" in old and "sweep_run_dir" not in old:
        old["sweep_run_dir"] = old["run_dir"]  # files written before the key existed
    # A matrix run alone keeps the last sweep's numbers, under the run_dir they came from.
    doc: dict = {k: v for k, v in old.items() if k.startswith("sweep_")}
    if args.sweep_only:
        doc = old
    doc["run_dir"] = str(run_dir)
    if not args.sweep_only:
        cfg = config_with_run_dir("matrix.yaml", run_dir, run_dir.parent / "matrix-bench.yaml")
        doc["matrix_wall_s"] = round(run(cfg, False, run_dir.parent / "matrix-bench.log"), 1)
        doc["matrix_stages_s"] = stage_times(run_dir)
        doc["contrasts"] = contrasts(run_dir, cfg)
        shutil.copy(run_dir / "report.md", RESULTS / "matrix_report.md")
        shutil.copy(run_dir / "docs" / "README.md", RESULTS / "matrix_docs_card.md")
    if args.sweep or args.sweep_only:
        scfg = config_with_run_dir(
            "matrix-sweep.yaml", run_dir, run_dir.parent / "matrix-sweep-bench.yaml"
        )
        doc["sweep_wall_s"] = round(run(scfg, True, run_dir.parent / "matrix-sweep-bench.log"), 1)
        doc["sweep_run_dir"] = str(run_dir)
        doc["sweep_stages_s"] = stage_times(run_dir)
        shutil.copy(run_dir / "report.md", RESULTS / "matrix_sweep_report.md")
        if (run_dir / "sweep.png").exists():
            shutil.copy(run_dir / "sweep.png", RESULTS / "matrix_sweep.png")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "contrasts"}, indent=2))


if __name__ == "__main__":
    main()
