"""The engine row contract, shared by the three back ends.

In: `messages` (OpenAI chat format; a trailing assistant message is a prefill that the model
continues) and `sampling_params` (`max_tokens`, `temperature`, `top_p`, `stop`, `seed`, and
optionally `logprobs`: the n most likely tokens at each generated position, and `regex`: a
regular expression the generated text must match, vLLM's structured outputs; engines that
cannot constrain decoding say so once in their log and generate freely).
`max_tokens == 0` asks for no generation: the row passes through as `skipped` (engines that
cannot skip send a 1-token request and blank it). An optional `model` column (http engine)
names the served model per row. Out: the kept columns plus OUTPUT_FIELDS; `reasoning_text`
is the reasoning a server returned apart from the answer (`reasoning` or
`reasoning_content`), null where the engine returns all text in `generated_text`;
`top_logprobs` holds, per generated token, the asked-for most likely tokens with their log
probabilities under the model (before temperature), null where none were asked for.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from deliberate_ray.config import SamplingConfig

SAMPLING_PARAMS = pa.struct(
    [
        ("max_tokens", pa.int32()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("stop", pa.list_(pa.string())),
        ("seed", pa.int64()),
        ("repetition_penalty", pa.float64()),
        ("logprobs", pa.int32()),
        ("regex", pa.string()),
    ]
)
TOKEN_LOGPROB = pa.struct([("token", pa.string()), ("logprob", pa.float64())])
# Logical CPUs of the light map stages (building requests, parsing, reading scores, an
# engine's own pre/post-processing). Ray Data splits the CPUs the engine actors leave among
# the other operators; on 2 cores each gets ~0.2, and a stage asking for more waits until
# the engines finish, which would stop shards from being committed while the teacher runs.
LIGHT_CPUS = 0.1
OUTPUT_FIELDS = [
    pa.field("generated_text", pa.string()),
    pa.field("num_input_tokens", pa.int32()),
    pa.field("num_generated_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),  # stop | length | skipped | error
    pa.field("engine_error", pa.string()),
    pa.field("reasoning_text", pa.string()),
    pa.field("top_logprobs", pa.list_(pa.list_(TOKEN_LOGPROB))),
]
OUTPUT_NAMES = [f.name for f in OUTPUT_FIELDS]
SKIPPED: dict[str, Any] = {
    "generated_text": "",
    "num_input_tokens": 0,
    "num_generated_tokens": 0,
    "finish_reason": "skipped",
    "engine_error": None,
    "reasoning_text": None,
    "top_logprobs": None,
}


def sampling_params(
    cfg: SamplingConfig,
    extra_stop: list[str] | None = None,
    seed: int | None = None,
    *,
    logprobs: int | None = None,
    regex: str | None = None,
) -> dict[str, Any]:
    """One row's sampling params: the config's, plus stage stop strings and a per-row seed,
    and optionally top-n log probabilities and a regular expression to decode under."""
    stop = list(dict.fromkeys([*cfg.stop, *(extra_stop or [])]))
    return {
        "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "stop": stop,
        "seed": seed,
        "repetition_penalty": cfg.repetition_penalty,
        "logprobs": logprobs,
        "regex": regex,
    }


def split_prefill(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str | None]:
    """A trailing assistant message is a prefill: (conversation before it, its text)."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def error_output(message: str) -> dict[str, Any]:
    return SKIPPED | {"finish_reason": "error", "engine_error": message[:2000]}


def finish_reason(num_generated: int, max_tokens: int) -> str:
    """For back ends that do not report it: hitting max_tokens means cut off."""
    return "length" if num_generated >= max_tokens else "stop"


def with_outputs(batch: pa.Table, keep: list[str], outputs: list[dict[str, Any]]) -> pa.Table:
    """The kept input columns plus the engine outputs, typed as the contract says."""
    cols = {name: batch.column(name) for name in keep}
    for f in OUTPUT_FIELDS:
        cols[f.name] = pa.array([o.get(f.name) for o in outputs], type=f.type)
    return pa.table(cols)


def to_py(value: Any) -> Any:
    """Ray Data rows hold numpy arrays for list columns; turn them back into lists."""
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: to_py(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_py(v) for v in value]
    return value
