"""The `deliberate-ray` command line. Each command is a thin shell over one stage module."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from deliberate_ray.config import ConfigError, ServeConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deliberative Alignment at cluster scale, on Ray.",
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Run config (YAML).")]


def fail(message: str, code: int = 2) -> None:
    """Print a clear error (no stack trace) and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def validate(config: Annotated[str, typer.Argument(help="Run config (YAML) to check.")]) -> None:
    """Check a config and the spec, prompt and suite files it names; exit 2 on any error."""
    from deliberate_ray.validate import validate_file

    errors = validate_file(config)
    if errors:
        typer.echo(f"{config}: {len(errors)} error(s)", err=True)
        for e in errors:
            typer.echo(f"  - {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{config}: OK")


config_app = typer.Typer(
    no_args_is_help=True, help="The config reference: every field, read from the models."
)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    section: Annotated[
        str | None,
        typer.Argument(help="A section, e.g. eval or generate.teacher (default: everything)."),
    ] = None,
) -> None:
    """Print every config field (or one section's): type, default, bounds, description."""
    from deliberate_ray.config_show import describe

    try:
        text = describe(section)
    except ValueError as e:
        fail(str(e))
    typer.echo(text, nl=False)


@app.command()
def spec(
    category: Annotated[str, typer.Argument(help="Category id, e.g. violence.")],
    path: Annotated[str, typer.Option("--spec", help="Spec YAML.")] = "specs/default.yaml",
    variant: Annotated[str, typer.Option(help="rules | values")] = "values",
) -> None:
    """Print spec_for(category, variant): what the teacher and judge see in context."""
    from deliberate_ray.spec import VARIANTS, load_spec

    if variant not in VARIANTS:
        fail(f"--variant: bad value {variant!r} -> allowed: {list(VARIANTS)}")
    try:
        s = load_spec(path)
    except ConfigError as e:
        fail(str(e))
    if category not in s.category_ids:
        fail(f"category: bad value {category!r} -> allowed: {s.category_ids}")
    typer.echo(s.render(category, variant))  # type: ignore[arg-type]
    typer.echo(f"[spec_sha {s.sha}]", err=True)


@app.command("prepare-model")
def prepare_model(
    ref: Annotated[str, typer.Argument(help="embedded:smollm2-135m-instruct | tiny-random | dir")],
) -> None:
    """Resolve a model reference (converting the embedded model once) and print its path."""
    from deliberate_ray.models import ModelRefError, resolve_model

    try:
        typer.echo(resolve_model(ref))
    except ModelRefError as e:
        fail(str(e))


@app.command()
def train(
    config: ConfigOpt,
    variant: Annotated[str | None, typer.Option(help="cot | no_cot | docs.")] = None,
    name: Annotated[str | None, typer.Option(help="Run name; rerunning a name resumes it.")] = None,
    data: Annotated[list[str] | None, typer.Option(help="Training file; repeatable.")] = None,
    stop_after: Annotated[
        int | None, typer.Option(help="End after this many steps (checkpointed); rerun to go on.")
    ] = None,
) -> None:
    """SFT on Ray Train (FSDP2, optional LoRA), then an HF export; prints a JSON summary."""
    import json

    from deliberate_ray.config import load_config, override
    from deliberate_ray.models import ModelRefError
    from deliberate_ray.pipeline import run_stage
    from deliberate_ray.train.data import TrainDataError

    try:
        cfg = load_config(config)
        if cfg.train is not None:
            flags = {"variant": variant, "name": name, "data": data or None}
            cfg = override(cfg, "config", train=override(cfg.train, "train", **flags))
        summary = run_stage(cfg, "train", stop_after=stop_after)
    except (ConfigError, ModelRefError, TrainDataError) as e:
        fail(str(e))
    typer.echo(json.dumps(summary.model_dump(mode="json"), indent=2))


@app.command()
def serve(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="[NAME=]REF; repeat to serve models side by side."),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address; default 127.0.0.1 (loopback only).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port; default 8000.")] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="Env var holding the API key (default DELIBERATE_RAY_API_KEY); every request "
            "needs it as a Bearer token. Unset or empty: an error, unless --no-auth."
        ),
    ] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve without authentication (warns).")
    ] = False,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="Run config; its serve section.")
    ] = None,
) -> None:
    """Serve models over the OpenAI chat API; prints the URL when ready, runs until Ctrl-C."""
    from deliberate_ray.serve import start_serve
    from deliberate_ray.serve.protocol import parse_model_args

    try:
        cfg = serve_config(
            config, host=host, port=port, api_key_env=api_key_env, no_auth=no_auth or None
        )
        models = parse_model_args(model) if model else cfg.models
        if not models:
            raise ValueError("give at least one --model [NAME=]REF (or serve.models in --config)")
        start_serve(models, cfg, blocking=True)
    except (ConfigError, ValueError) as e:
        fail(str(e))


def serve_config(path: str | None, **overrides: object) -> ServeConfig:
    """The config's serve section (or the defaults) with the command-line values on top."""
    from deliberate_ray.config import ServeConfig, load_config, override

    base = (load_config(path).serve if path else None) or ServeConfig()
    return override(base, "serve", **overrides)


@app.command()
def grade(
    input: Annotated[str, typer.Option("--input", help="JSONL with prompt and completion.")],
    output: Annotated[str, typer.Option("--output", help="JSONL to write (label, refusal).")],
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
) -> None:
    """Label completions full_compliance | full_refusal | partial_refusal (refusal: bool)."""
    from pathlib import Path

    from deliberate_ray.graders.refusal import grade_file

    if not Path(input).is_file():
        fail(f"--input: bad value {input!r} -> file not found (or not a file)")
    if not Path(output).resolve().parent.is_dir():
        fail(f"--output: bad value {output!r} -> its folder does not exist")
    try:
        counts = grade_file(Path(input), Path(output), batch_size)
    except ValueError as e:
        fail(str(e))
    typer.echo(f"{output}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


suites_app = typer.Typer(
    no_args_is_help=True, help="Public benchmark suites (evaluation only) and the guard."
)
app.add_typer(suites_app, name="suites")


@suites_app.command("build")
def suites_build(
    name: Annotated[str, typer.Argument(help="strongreject | harmbench")],
    out: Annotated[
        str | None, typer.Option("--out", help="Suite JSONL (default: the cache's suites/).")
    ] = None,
) -> None:
    """Write a suite file from a public benchmark's PyPI data package (rows eval_only)."""
    from pathlib import Path

    from deliberate_ray.evals.public import SOURCES, build_public_suite

    try:
        path, n = build_public_suite(name, Path(out) if out else None)
    except ConfigError as e:
        fail(str(e))
    typer.echo(f"{path}: {n} prompts from {SOURCES[name].package} ({SOURCES[name].licence})")


@suites_app.command("check")
def suites_check(
    prompts: Annotated[list[str], typer.Option("--prompts", help="Prompt JSONL; repeatable.")],
    suite: Annotated[
        list[str] | None, typer.Option("--suite", help="More suites to check against.")
    ] = None,
) -> None:
    """Exit 2, listing ids, if any prompt is a row of an evaluation-only suite."""
    from pathlib import Path

    from deliberate_ray.evals.public import check_eval_only, default_guard_suites, last_user_text
    from deliberate_ray.records import iter_records

    missing = [p for p in [*prompts, *(suite or [])] if "://" not in p and not Path(p).is_file()]
    if missing:
        fail(f"file not found: {', '.join(missing)}")
    pairs = []
    try:
        for path in prompts:
            for n, rec in iter_records(path):
                if (text := last_user_text(rec)) is not None:
                    pairs.append((str(rec.get("id", f"{path}:{n}")), text))
        suites = default_guard_suites(suite or [])
        check_eval_only(pairs, suites)
    except ConfigError as e:
        fail(str(e))
    except (OSError, ValueError) as e:  # unreadable or of an unknown format
        fail(f"{e}")
    typer.echo(f"{len(pairs)} prompts: none is in the {len(suites)} evaluation-only suites")


@app.command("eval")
def eval_(
    endpoint: Annotated[str, typer.Option(help="OpenAI-compatible base URL, e.g. .../v1.")],
    model: Annotated[list[str], typer.Option("--model", help="Served model name; repeatable.")],
    out: Annotated[str, typer.Option("--out", help="Output directory.")],
    suite: Annotated[
        list[str] | None, typer.Option("--suite", help="Suite JSONL; repeatable.")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Env var holding the endpoint's API key.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="N evenly spaced prompts per suite.")
    ] = None,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="Run config; its eval section.")
    ] = None,
) -> None:
    """Ask each model every suite prompt, grade, write responses/metrics/report/chart."""
    from deliberate_ray.config import EvalConfig, load_config, override, resolve_run
    from deliberate_ray.evals import run_eval
    from deliberate_ray.evals.collect import EndpointError
    from deliberate_ray.evals.report import fmt, headline

    try:
        cfg = (resolve_run(load_config(config)).eval if config else None) or EvalConfig()
        cfg = override(
            cfg, "eval", api_key_env=api_key_env, limit=limit, suites=suite or None, output_dir=out
        )
        doc = run_eval(cfg, out, models=model, endpoint=endpoint)
    except (ConfigError, EndpointError, ValueError) as e:
        fail(str(e))
    for m, suites in doc.results.items():
        for s, entry in suites.items():
            for name, value in headline(entry).items():
                typer.echo(f"{m:>20} {s:>18} {name:>16}: {fmt(value)}")
    typer.echo(f"wrote {out}/responses.parquet, metrics.json, report.md, metrics.png")


ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar.")]
FreshOpt = Annotated[
    bool, typer.Option("--fresh", help="Delete the output_dir's earlier shards first.")
]


def run_resumable(config: str, section: str, progress: bool, fresh: bool) -> None:
    """A stage that commits shards and resumes (generate, docs): load, check its section,
    run, print its summary; config problems exit 2 with the message."""
    from deliberate_ray.config import load_config
    from deliberate_ray.pipeline import run_stage

    if section == "generate":
        from deliberate_ray.generate.run import summary
    else:
        from deliberate_ray.msm.docs import summary
    try:
        cfg = load_config(config)
        if getattr(cfg, section) is None:
            example = "configs/demo.yaml" if section == "generate" else "configs/matrix.yaml"
            raise ValueError(f"{config} has no `{section}:` section (see {example})")
        result = run_stage(cfg, section, progress=progress, fresh=fresh)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    typer.echo(summary(result))


@app.command()
def generate(config: ConfigOpt, progress: ProgressOpt = True, fresh: FreshOpt = False) -> None:
    """Generate spec-grounded CoT tuples (teacher, judge, best of n); a rerun resumes."""
    run_resumable(config, "generate", progress, fresh)


@app.command()
def docs(config: ConfigOpt, progress: ProgressOpt = True, fresh: FreshOpt = False) -> None:
    """Write the spec-document corpus for Model Spec Midtraining; a rerun resumes."""
    run_resumable(config, "docs", progress, fresh)


@app.command()
def rl(
    config: ConfigOpt,
    arm: Annotated[
        str | None, typer.Option(help="The arm to continue (default: rl.arm); its run folder.")
    ] = None,
    init_model: Annotated[
        str | None,
        typer.Option(help="Start from this model (default: rl.init_model, else the arm's export)."),
    ] = None,
    stop_after: Annotated[
        int | None,
        typer.Option(min=1, help="End after this iteration (checkpointed); rerun to go on."),
    ] = None,
) -> None:
    """RL after SFT: GRPO rollouts on the engines, the judge (CoT hidden) as reward, updates on
    Ray Train; prints the reward per iteration and the held-in refusal rates; a rerun goes on."""
    from deliberate_ray.config import load_config, override
    from deliberate_ray.models import ModelRefError
    from deliberate_ray.pipeline import run_stage
    from deliberate_ray.rl.run import summary_text

    try:
        cfg = load_config(config)
        if cfg.rl is not None:
            rl_cfg = override(cfg.rl, "rl", arm=arm, init_model=init_model)
            cfg = override(cfg, "config", rl=rl_cfg)
        summary = run_stage(cfg, "rl", stop_after=stop_after)
    except (ConfigError, ModelRefError, ValueError) as e:
        fail(str(e))
    typer.echo(summary_text(summary))


@app.command()
def pipeline(
    config: ConfigOpt,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Rerun stages whose config changed (their outputs are deleted)."
        ),
    ] = False,
) -> None:
    """Run everything: generate -> train each arm -> serve base + arms -> eval -> report.

    Stages that finished earlier in the same run_dir with the same config are skipped; a
    stage whose config or inputs changed is refused unless --force; a killed run resumes."""
    from deliberate_ray.config import load_config
    from deliberate_ray.pipeline import run_pipeline, summary_table

    try:
        summary = run_pipeline(load_config(config), force=force)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    typer.echo(summary_table(summary))


if __name__ == "__main__":
    app()
