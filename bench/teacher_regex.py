"""The teacher with and without `constrain` (decoding under the reply regex), side by side on
the same requests in one offline vLLM engine: tokens/s, well-formed samples (parsed into
CoT + answer, not cut off), and samples whose reasoning names a policy of their own category.

Modes: `free` (no regex), `constrained` (teacher.reply_regex: a bounded reasoning line, an
unbounded answer line), `long-answer` (the same with the answer line bounded to 600
characters, the first version: xgrammar's masks for long bounded repetitions are slow).

    .venv/bin/python bench/teacher_regex.py --prompts 96 --out bench/results/teacher_regex.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deliberate_ray.config import load_config  # noqa: E402
from deliberate_ray.engines.select import vllm_cpu_env_vars  # noqa: E402
from deliberate_ray.engines.vllm import engine_kwargs  # noqa: E402
from deliberate_ray.generate.teacher import (  # noqa: E402
    parse,
    reply_regex,
    stop_strings,
    teacher_messages,
)
from deliberate_ray.models import resolve_model  # noqa: E402
from deliberate_ray.spec import load_spec  # noqa: E402

MODES = ("free", "constrained", "long-answer")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--prompts", type=int, default=96)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "teacher_regex.json")
    a = p.parse_args()
    if os.environ.get("_TEACHER_REGEX_ENV") != "1":  # LD_PRELOAD acts at process start only
        env = os.environ | vllm_cpu_env_vars() | {"_TEACHER_REGEX_ENV": "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    cfg = load_config(a.config)
    t = cfg.generate.teacher
    spec = load_spec(cfg.spec.path)
    rows = [json.loads(line) for line in (ROOT / "data" / "prompts" / "seed.jsonl").open()]
    random.Random(1).shuffle(rows)
    rows = rows[: a.prompts]
    user = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    msgs = [
        teacher_messages(u, spec, r["category"], cfg.spec.variant, t)
        for u, r in zip(user, rows, strict=True)
    ]
    llm = LLM(resolve_model(t.engine.model), **engine_kwargs(t.engine))
    stops = list(dict.fromkeys([*t.sampling.stop, *stop_strings(t)]))
    result: dict = {
        "config": a.config,
        "requests": len(rows),
        "max_tokens": t.sampling.max_tokens,
        "temperature": t.sampling.temperature,
        "load_avg_before": os.getloadavg(),
    }
    for mode in a.modes.split(","):
        params = []
        for r in rows:
            kw = {
                "max_tokens": t.sampling.max_tokens,
                "temperature": t.sampling.temperature,
                "top_p": t.sampling.top_p,
                "stop": stops,
            }
            if mode != "free":
                regex = reply_regex(spec, r["category"], t)
                if mode == "long-answer":
                    regex = regex.replace("[^\\n]+\\n?", "[^\\n]{1,600}\\n?")
                kw["structured_outputs"] = StructuredOutputsParams(regex=regex)
            params.append(SamplingParams(**kw))
        start = time.time()
        out = llm.chat(
            msgs, params, continue_final_message=True, add_generation_prompt=False, use_tqdm=False
        )
        seconds = time.time() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in out)
        parsed = [parse(o.outputs[0].text, o.outputs[0].finish_reason, None, t) for o in out]
        cites = [
            p.cot is not None and any(i in p.cot for i in spec.policy_ids(r["category"]))
            for p, r in zip(parsed, rows, strict=True)
        ]
        well = [p.malformed is None for p in parsed]
        result[mode] = {
            "seconds": round(seconds, 1),
            "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1),
            "well_formed": sum(well),
            "cites_own_policy": sum(cites),
            "well_formed_and_cites_own": sum(w and c for w, c in zip(well, cites, strict=True)),
            "truncated": sum(p.malformed == "truncated" for p in parsed),
        }
        print(mode, json.dumps(result[mode]), flush=True)
    result["load_avg_after"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
