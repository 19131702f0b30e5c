"""`ray.serve.llm` (vLLM) serving on CPU: the embedded model behind an API key, a chat
completion with vLLM's reasoning parser on, and how the eval reads such replies. Serve starts
once for the module (~30 s of vLLM engine start on 2 cores)."""

from __future__ import annotations

import socket

import httpx
import pytest
from vllm_support import VLLM_MARKS

from deliberate_ray.config import ServeConfig
from deliberate_ray.engines.http import reply_parts
from deliberate_ray.models import resolve_model

pytestmark = VLLM_MARKS

MODEL = "embedded:smollm2-135m-instruct"
KEY_ENV, KEY = "DELIBERATE_RAY_VLLM_TEST_KEY", "vllm-key-456"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = {"role": "user", "content": "What is the capital of France?"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(ray_session):
    from deliberate_ray.serve import shutdown, start_serve

    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, KEY)
    cfg = ServeConfig(port=free_port(), api_key_env=KEY_ENV, num_cpus=0.5)  # engine: auto
    base = start_serve({"base": MODEL}, cfg)  # logs the time serve.run took to be ready
    yield base
    shutdown()
    mp.undo()


def test_api_key_enforced(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for r in (
            httpx.get(f"{url}/models", headers=headers, timeout=30),
            httpx.get(f"{url}/models/base", headers=headers, timeout=30),
            httpx.post(
                f"{url}/chat/completions",
                json={"model": "base", "messages": [USER], "max_tokens": 2},
                headers=headers,
                timeout=30,
            ),
        ):
            assert r.status_code == 401, r.text
            error = r.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
            assert set(error) == {"message", "type", "param", "code"}
    listed = httpx.get(f"{url}/models", headers=AUTH, timeout=30)
    assert listed.status_code == 200
    assert [m["id"] for m in listed.json()["data"]] == ["base"]


def test_chat_completion(url):
    body = {"model": "base", "messages": [USER], "max_tokens": 16, "temperature": 0, "seed": 0}
    r = httpx.post(f"{url}/chat/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    reply = r.json()
    choice = reply["choices"][0]
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # vLLM counts reasoning tokens only when a reasoning parser is configured: ours reached it.
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


def test_prefill_is_continued_and_not_parsed(url):
    """A trailing assistant turn is continued (vLLM's `continue_final_message`, which the
    `http` engine sends). The reasoning parser reads the generated text only, so a `<think>`
    prefill without a generated `</think>` stays content: the split below is the eval's."""
    from transformers import AutoTokenizer

    messages = [USER, {"role": "assistant", "content": "<think>"}]
    body = {
        "model": "base",
        "messages": messages,
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": 8,
        "temperature": 0,
        "stop": ["</think>"],
    }
    r = httpx.post(f"{url}/chat/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    text = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert text.endswith("assistant\n<think>")  # continued: no end of turn after the prefill
    prompt_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert r.json()["usage"]["prompt_tokens"] == prompt_tokens
    assert r.json()["choices"][0]["message"]["reasoning"] is None


@pytest.mark.parametrize(
    ("generated", "reasoning", "content"),
    [
        ("Paris.", None, "Paris."),
        ("<think>Easy.</think> Paris.", "Easy.", " Paris."),
        ("Easy.</think> Paris.", "Easy.", " Paris."),  # the template opened the block
        # cut off before `</think>`: olmo3 leaves it all in the content; the eval reads it as
        # reasoning with no answer, a failed request (evals/collect.py)
        ("<think>Still thinking", "Still thinking", ""),
    ],
)
def test_olmo3_split_as_the_eval_reads_it(generated, reasoning, content):
    """The server's parser on the embedded model's tokenizer, then the eval's reading."""
    from transformers import AutoTokenizer
    from vllm.reasoning.olmo3_reasoning_parser import Olmo3ReasoningParser

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    parsed, rest = Olmo3ReasoningParser(tokenizer).extract_reasoning(generated, None)
    message = {"role": "assistant", "reasoning": parsed, "content": rest or ""}
    assert reply_parts(message, message["content"]) == (reasoning, content)
