"""The OpenAI protocol pieces of the Serve app, without Ray: validation, reasoning split,
model arguments."""

from __future__ import annotations

import os

import pytest

from deliberate_ray.serve.protocol import (
    APIError,
    check_api_key,
    completion_response,
    key_digest,
    parse_chat_request,
    parse_model_args,
    split_reasoning,
)

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("plain answer", None, "plain answer"),
        ("<think>VIO-1 applies.</think>\n\nI can't help.", "VIO-1 applies.", "I can't help."),
        ("VIO-1 applies.</think> No.", "VIO-1 applies.", "No."),  # template opened <think>
        ("<think>still thinking when cut off", "still thinking when cut off", ""),
    ],
)
def test_split_reasoning(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)


def test_completion_response_shape():
    resp = completion_response("m", [("<think>a</think>b", "stop"), ("c", "length")], 5, 7)
    assert resp["object"] == "chat.completion" and resp["model"] == "m"
    assert resp["choices"][0]["message"] == {
        "role": "assistant",
        "content": "b",
        "reasoning_content": "a",
    }
    assert resp["choices"][1]["finish_reason"] == "length"
    assert resp["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def test_request_defaults_and_stop_forms():
    req = parse_chat_request({"model": "m", "messages": USER, "stop": "\n\n"})
    assert (req.temperature, req.top_p, req.n, req.max_tokens) == (1.0, 1.0, 1, None)
    assert req.stop == ["\n\n"]
    assert parse_chat_request({"model": "m", "messages": USER, "stop": None}).stop == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": USER}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "system", "content": "x"}]}, "messages"),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"model": "m", "messages": USER, "max_tokens": "5"}, "max_tokens"),
        ({"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": USER, "n": True}, "n"),
        ({"model": "m", "messages": USER, "temperature": 3}, "temperature"),
        ({"model": "m", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "messages": USER, "stream": True}, "stream"),
    ],
)
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(APIError) as e:
        parse_chat_request(body)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["message"].startswith(param)


def test_model_args():
    assert parse_model_args(["tiny-random", "base=embedded:smollm2-135m-instruct"]) == {
        "tiny-random": "tiny-random",
        "base": "embedded:smollm2-135m-instruct",
    }
    assert parse_model_args(["runs/x/export/"]) == {"export": "runs/x/export/"}
    for bad in (["a=x", "a=y"], ["bad name=x"], ["a="], []):
        with pytest.raises(ValueError):
            parse_model_args(bad)


def test_serve_and_eval_commands_reject_bad_input_before_starting(tmp_path):
    from typer.testing import CliRunner

    from deliberate_ray.cli import app

    runner = CliRunner()
    bad_name = runner.invoke(app, ["serve", "--model", "bad name=tiny-random"])
    assert bad_name.exit_code == 2 and "must be 1-64 letters" in bad_name.output
    bad_port = runner.invoke(app, ["serve", "--model", "tiny-random", "--port", "70000"])
    assert bad_port.exit_code == 2 and "port" in bad_port.output
    no_model = runner.invoke(app, ["serve"])
    assert no_model.exit_code == 2 and "--model" in no_model.output
    unreachable = runner.invoke(
        app,
        ["eval", "--suite", "data/eval/in_distribution.jsonl", "--endpoint",
         "http://127.0.0.1:9", "--model", "m", "--out", str(tmp_path)],
    )  # fmt: skip
    assert unreachable.exit_code == 2 and "cannot reach" in unreachable.output


def test_serving_fails_closed_without_a_key(monkeypatch, caplog):
    """An unset or empty key variable stops `serve` with exit 2 before anything starts;
    only --no-auth serves without a key, and says so."""
    from typer.testing import CliRunner

    from deliberate_ray.cli import app
    from deliberate_ray.config import ServeConfig
    from deliberate_ray.serve.launch import api_key_digest, run_key

    runner = CliRunner()
    monkeypatch.delenv("DELIBERATE_RAY_API_KEY", raising=False)
    unset = runner.invoke(app, ["serve", "--model", "tiny-random"])
    assert unset.exit_code == 2 and "DELIBERATE_RAY_API_KEY, which is not set" in unset.output
    assert "--no-auth" in unset.output
    monkeypatch.setenv("MY_KEY", "  ")
    empty = runner.invoke(app, ["serve", "--model", "tiny-random", "--api-key-env", "MY_KEY"])
    assert empty.exit_code == 2 and "MY_KEY, which is not set or empty" in empty.output
    with caplog.at_level("WARNING"):
        assert api_key_digest(ServeConfig(no_auth=True)) is None
    assert "WITHOUT authentication" in caplog.text
    monkeypatch.setenv("MY_KEY", "k3y")
    assert api_key_digest(ServeConfig(api_key_env="MY_KEY")) == key_digest("k3y")
    # The pipeline's own server: a fresh key while it runs, where none is set.
    with run_key(ServeConfig()):
        fresh = os.environ["DELIBERATE_RAY_API_KEY"]
        assert len(fresh) >= 32 and api_key_digest(ServeConfig()) == key_digest(fresh)
    assert "DELIBERATE_RAY_API_KEY" not in os.environ
    with run_key(ServeConfig(api_key_env="MY_KEY")):
        assert os.environ["MY_KEY"] == "k3y"  # the user's key is kept


def test_check_api_key():
    digest = key_digest("k3y")
    check_api_key("Bearer k3y", digest)
    check_api_key("bearer  k3y ", digest)
    check_api_key("", None)  # no key configured: no authentication
    for header in ("", "k3y", "Bearer", "Bearer wrong", "Basic k3y"):
        with pytest.raises(APIError) as e:
            check_api_key(header, digest)
        assert e.value.status == 401 and e.value.body()["error"]["code"] == "invalid_api_key"
