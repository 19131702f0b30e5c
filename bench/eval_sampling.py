"""Eval decoding settings side by side: how long the replies run, how many are cut off at
`max_tokens`, and how many fail the coherence check, per model and sampling setting, on the
in-distribution suite in one offline vLLM engine per model (the eval's requests: the
question alone, each model's own chat template).

Why: under greedy decoding the 135M models loop until `max_tokens` (the demo's base model on
85 of 96 prompts), so the eval measures loops, and generating them is most of the eval's time.
The settings compared: greedy; SmolLM2's model-card sampling (temperature 0.2, top-p 0.9);
temperature 0.7 without top-p; and greedy with a repetition penalty.

    .venv/bin/python bench/eval_sampling.py --model cot=runs/demo/train/cot/export \
        --model no_cot=runs/demo/train/no_cot/export --out bench/results/eval_sampling.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deliberate_ray.engines.select import vllm_cpu_env_vars  # noqa: E402
from deliberate_ray.engines.vllm import cpu_engine_kwargs  # noqa: E402
from deliberate_ray.graders.coherence import degenerate  # noqa: E402
from deliberate_ray.models import resolve_model  # noqa: E402

SETTINGS: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "t0.2-p0.9": {"temperature": 0.2, "top_p": 0.9},
    "t0.7": {"temperature": 0.7, "top_p": 1.0},
    "greedy-rep1.1": {"temperature": 0.0, "repetition_penalty": 1.1},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default=str(ROOT / "data" / "eval" / "in_distribution.jsonl"))
    p.add_argument(
        "--model", action="append", default=[], help="NAME=PATH (base is always included)"
    )
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--kv-cache-gib", type=float, default=0.5, help="per engine")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "eval_sampling.json")
    a = p.parse_args()
    if os.environ.get("_EVAL_SAMPLING_ENV") != "1":  # LD_PRELOAD acts at process start only
        env = os.environ | vllm_cpu_env_vars() | {"_EVAL_SAMPLING_ENV": "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    from vllm import LLM, SamplingParams

    rows = [json.loads(line) for line in Path(a.suite).open()]
    models = {"base": resolve_model("embedded:smollm2-135m-instruct")}
    models |= dict(m.split("=", 1) for m in a.model)
    result: dict = {
        "suite": a.suite,
        "requests": len(rows),
        "max_tokens": a.max_tokens,
        "kv_cache_gib": a.kv_cache_gib,
        "load_avg_before": os.getloadavg(),
        "models": {},
    }
    for name, path in models.items():
        llm = LLM(str(path), **cpu_engine_kwargs("auto", a.kv_cache_gib, {}))
        per: dict = {}
        for setting in a.settings.split(","):
            params = SamplingParams(max_tokens=a.max_tokens, **SETTINGS[setting])
            msgs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
            t0 = time.perf_counter()
            outs = llm.chat(msgs, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            n_tok = [len(o.outputs[0].token_ids) for o in outs]
            texts = [o.outputs[0].text for o in outs]
            cut = sum(o.outputs[0].finish_reason == "length" for o in outs)
            bad = [degenerate(t, r["prompt"]) for t, r in zip(texts, rows, strict=True)]
            per[setting] = {
                "wall_s": round(wall, 1),
                "tokens": sum(n_tok),
                "tok_per_s": round(sum(n_tok) / wall, 1),
                "mean_tokens": round(statistics.mean(n_tok), 1),
                "cut_at_max_tokens": cut,
                "degenerate": sum(b is not None for b in bad),
                "degenerate_reasons": {r: bad.count(r) for r in sorted({b for b in bad if b})},
                "examples": [t[:300] for t in texts[:3]],
            }
            print(name, setting, {k: v for k, v in per[setting].items() if k != "examples"})
        result["models"][name] = per
        del llm
        gc.collect()
    result["load_avg_after"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
