"""Engines: the transformers generator, and the row contract on hf / http / vLLM back ends."""

from __future__ import annotations

import pyarrow as pa
import pytest
from openai_stub import StubServer

from deliberate_ray.config import EngineConfig, SamplingConfig
from deliberate_ray.contracts import MESSAGES
from deliberate_ray.engines import apply_engine
from deliberate_ray.engines.hf import GenRequest, HFGenerator
from deliberate_ray.engines.rows import OUTPUT_NAMES, SAMPLING_PARAMS, sampling_params

SYSTEM = {"role": "system", "content": "You are a helpful assistant. " * 8}


def chat(text: str) -> list[dict[str, str]]:
    return [SYSTEM, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def generator(tiny_model) -> HFGenerator:
    return HFGenerator(tiny_model, device="cpu", torch_threads=2)


def test_greedy_matches_transformers_generate(generator):
    import torch

    req = GenRequest(chat("Name a colour."), max_tokens=12, temperature=0.0)
    ids = generator.tokenizer(
        generator.prompt_text(req), return_tensors="pt", add_special_tokens=False
    )
    with torch.inference_mode():
        ref = generator.model.generate(**ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    want = generator.tokenizer.decode(ref[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    # Batched with other prompts (shared prefix + left padding), the row is unchanged.
    others = [GenRequest(chat(f"Question {i} is a longer one."), 12, 0.0) for i in range(3)]
    got = generator.generate([*others, req])[-1]
    assert got.generated_text == want
    assert got.num_generated_tokens == 12 and got.finish_reason == "length"
    assert got.num_input_tokens == ids.input_ids.shape[1]


def test_repetition_penalty_matches_transformers_generate(generator):
    """The hf engine's penalty is transformers' (prompt and reply tokens), row by row: a
    penalised row beside an unpenalised one decodes as `generate(repetition_penalty=)`."""
    import torch

    req = GenRequest(chat("Name a colour."), 16, 0.0, repetition_penalty=2.0)
    ids = generator.tokenizer(
        generator.prompt_text(req), return_tensors="pt", add_special_tokens=False
    )
    with torch.inference_mode():
        ref = generator.model.generate(
            **ids, max_new_tokens=16, do_sample=False, min_new_tokens=16, repetition_penalty=2.0
        )
    want = generator.tokenizer.decode(ref[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    plain = GenRequest(chat("Name a colour."), 16, 0.0)
    got_plain, got = generator.generate([plain, req])
    assert got.generated_text == want
    assert got_plain.generated_text != got.generated_text


def test_seeds_are_deterministic_and_rows_independent(generator):
    reqs = [GenRequest(chat("Tell me a story."), 10, 1.0, seed=s) for s in (1, 1, 2)]
    a = generator.generate(reqs)
    b = generator.generate(list(reversed(reqs)))[::-1]
    assert [r.generated_text for r in a] == [r.generated_text for r in b]
    assert a[0].generated_text == a[1].generated_text != a[2].generated_text


def test_stop_strings_prefill_and_mixed_params(generator):
    free = generator.generate([GenRequest(chat("Hi"), 24, 0.0)])[0].generated_text
    stop = free[5:8]  # a string the greedy text will produce
    mixed = [
        GenRequest(chat("Hi"), 24, 0.0, stop=[stop]),
        GenRequest(chat("Hi"), 3, 0.9, seed=0),
        GenRequest(chat("Hi"), 24, 0.0, prefill="Reasoning:"),
    ]
    cut, short, prefilled = generator.generate(mixed)
    assert cut.finish_reason == "stop" and cut.generated_text == free[: free.index(stop)]
    assert short.num_generated_tokens == 3 and short.finish_reason == "length"
    assert prefilled.num_input_tokens > cut.num_input_tokens
    assert not prefilled.generated_text.startswith("Reasoning:")


def test_prompt_longer_than_the_model_is_an_error(generator):
    with pytest.raises(ValueError, match="exceeds the model's"):
        generator.generate([GenRequest(chat("Hi"), max_tokens=100_000)])


def request_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema(
        [("id", pa.string()), ("messages", MESSAGES), ("sampling_params", SAMPLING_PARAMS)]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def rows_for_engine() -> list[dict]:
    sp = sampling_params(SamplingConfig(max_tokens=6, temperature=0.0), ["\nUser:"])
    prefilled = [*chat("Why is the sky blue?"), {"role": "assistant", "content": "Reasoning:"}]
    return [
        {"id": "plain", "messages": chat("Hello"), "sampling_params": sp},
        {"id": "prefill", "messages": prefilled, "sampling_params": sp},
        {"id": "skip", "messages": chat("-"), "sampling_params": sp | {"max_tokens": 0}},
        {"id": "too_long", "messages": chat("Hi"), "sampling_params": sp | {"max_tokens": 99_999}},
    ]


@pytest.mark.ray
def test_hf_engine_on_ray_data(ray_session, tiny_model):
    ds = ray_session.data.from_arrow(request_table(rows_for_engine()))
    cfg = EngineConfig(kind="hf", model=tiny_model, batch_size=4, num_cpus=0.5, torch_threads=1)
    out = {r["id"]: r for r in apply_engine(ds, cfg, keep=["id"]).take_all()}
    assert set(next(iter(out.values()))) == {"id", *OUTPUT_NAMES}
    assert out["plain"]["num_generated_tokens"] == 6 and out["plain"]["engine_error"] is None
    assert out["prefill"]["num_input_tokens"] > out["plain"]["num_input_tokens"]
    assert out["skip"]["finish_reason"] == "skipped" and out["skip"]["generated_text"] == ""
    # One bad row fails alone; the rest of its batch still generates.
    assert out["too_long"]["finish_reason"] == "error"
    assert "exceeds the model's" in out["too_long"]["engine_error"]


def echo(body: dict) -> str:
    return "echo: " + body["messages"][-1]["content"]


@pytest.mark.ray
def test_http_engine_against_a_local_server(ray_session, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-test")
    with StubServer(echo, api_key="sk-test") as server:
        cfg = EngineConfig(
            kind="http",
            model="stub",
            base_url=server.base_url,
            api_key_env="STUB_KEY",
            batch_size=2,
            max_retries=0,
        )
        rows = rows_for_engine()[:3]
        ds = ray_session.data.from_arrow(request_table(rows))
        out = {r["id"]: r for r in apply_engine(ds, cfg, keep=["id"]).take_all()}
        sent = {r["messages"][-1]["content"]: r for r in server.requests}
    assert out["plain"]["generated_text"] == "echo: Hello"
    assert out["plain"]["num_input_tokens"] == 100 and out["plain"]["finish_reason"] == "stop"
    assert out["prefill"]["generated_text"] == "echo: Reasoning:"
    assert out["skip"]["finish_reason"] == "skipped" and out["skip"]["generated_text"] == ""
    assert sent["Reasoning:"]["continue_final_message"] is True
    assert "continue_final_message" not in sent["Hello"]
    assert sent["Hello"]["stop"] == ["\nUser:"] and sent["Hello"]["max_tokens"] == 6
    assert sent["-"]["max_tokens"] == 1  # skipped rows cost one token on engines that cannot skip
    assert {r["_auth"] for r in server.requests} == {"Bearer sk-test"}


@pytest.mark.ray
def test_http_engine_sends_a_batch_at_once(ray_session):
    """The rows of one batch are in flight together (Ray's HTTP stage would otherwise send
    them one after another), and each row may name its own model."""
    with StubServer(echo) as server:
        server.delay_s = 0.5
        cfg = EngineConfig(
            kind="http", model="stub", base_url=server.base_url, batch_size=6, concurrency=1
        )
        params = sampling_params(SamplingConfig(max_tokens=8, temperature=0.0))
        rows = [
            {"id": str(i), "model": f"m{i % 2}", "sampling_params": params,
             "messages": [{"role": "user", "content": f"q{i}"}]}
            for i in range(6)
        ]  # fmt: skip
        out = apply_engine(ray_session.data.from_items(rows), cfg, keep=["id"]).take_all()
    assert sorted(r["generated_text"] for r in out) == [f"echo: q{i}" for i in range(6)]
    assert server.max_in_flight >= 4, server.max_in_flight
    assert {r["messages"][-1]["content"]: r["model"] for r in server.requests} == {
        f"q{i}": f"m{i % 2}" for i in range(6)
    }


@pytest.mark.ray
def test_http_engine_retries_server_errors_and_counts_what_still_fails(ray_session):
    """A 500 (what a Serve replica that dies mid-request answers) is tried again; a row whose
    tries all fail becomes an engine error."""
    with StubServer(echo) as server:
        cfg = EngineConfig(
            kind="http", model="stub", base_url=server.base_url, batch_size=1, concurrency=1,
            max_retries=2,
        )  # fmt: skip
        rows = rows_for_engine()[:1]
        server.fail_next = 2  # the first two tries fail, the third answers
        out = apply_engine(ray_session.data.from_arrow(request_table(rows)), cfg, ["id"]).take_all()
        assert [r["generated_text"] for r in out] == ["echo: Hello"]
        assert len(server.requests) == 3
        server.requests.clear()
        server.fail_next = 3  # all three tries fail: a counted error row, not a failed run
        out = apply_engine(ray_session.data.from_arrow(request_table(rows)), cfg, ["id"]).take_all()
    assert [r["finish_reason"] for r in out] == ["error"]
    assert "failed after 3 tries" in out[0]["engine_error"]
    assert "replica died" in out[0]["engine_error"]
    assert len(server.requests) == 3


def test_http_key_must_be_in_the_environment(monkeypatch):
    from deliberate_ray.engines.http import processor_config

    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    cfg = EngineConfig(kind="http", base_url="http://x/v1", api_key_env="NO_SUCH_KEY")
    with pytest.raises(ValueError, match="NO_SUCH_KEY"):
        processor_config(cfg)


def test_http_error_body_becomes_an_engine_error():
    from deliberate_ray.engines.http import response_output

    out = response_output({"error": {"message": "model not found"}}, max_tokens=8)
    assert out["finish_reason"] == "error" and "model not found" in out["engine_error"]


@pytest.mark.ray
def test_vllm_processor_config_field_by_field(ray_session, tiny_model):
    from deliberate_ray.engines import vllm

    cfg = EngineConfig(
        kind="vllm",
        model=tiny_model,
        batch_size=32,
        concurrency=2,
        accelerator_type="L40S",
        engine_kwargs={
            "tensor_parallel_size": 4,
            "max_model_len": 8192,
            "enable_prefix_caching": True,
        },
        chat_template_kwargs={"enable_thinking": True},
    )
    pc = vllm.processor_config(cfg)
    assert pc.model_source == tiny_model
    assert pc.batch_size == 32 and pc.concurrency == 2 and pc.accelerator_type == "L40S"
    assert pc.engine_kwargs == {
        "tensor_parallel_size": 4,
        "max_model_len": 8192,
        "enable_prefix_caching": True,
        "task_type": "generate",
    }
    assert pc.should_continue_on_error is True
    stages = {type(s).__name__: s for s in vllm.build(cfg).stages.values()}
    assert list(stages) == [
        "ChatTemplateStage",
        "TokenizeStage",
        "vLLMEngineStage",
        "DetokenizeStage",
    ]
    assert stages["ChatTemplateStage"].fn_constructor_kwargs["chat_template_kwargs"] == {
        "enable_thinking": True
    }
    engine = stages["vLLMEngineStage"]
    assert engine.fn_constructor_kwargs["engine_kwargs"]["tensor_parallel_size"] == 4
    assert engine.fn_constructor_kwargs["engine_kwargs"]["distributed_executor_backend"] == "ray"
    assert engine.map_batches_kwargs["accelerator_type"] == "L40S"
    assert engine.map_batches_kwargs["compute"].max_size == 2


def test_hf_logprobs_are_the_models_top_tokens(generator):
    """Asked-for logprobs: per generated token the n most likely, best first; under greedy
    decoding the chosen token is the top one, and the probabilities are those of the model."""
    import math

    asked, plain = generator.generate(
        [GenRequest(chat("Name a colour."), 4, 0.0, logprobs=5), GenRequest(chat("Hi"), 4, 0.0)]
    )
    assert plain.top_logprobs is None
    top = asked.top_logprobs
    assert top is not None and len(top) == asked.num_generated_tokens == 4
    for position in top:
        assert len(position) == 5
        probs = [math.exp(t["logprob"]) for t in position]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    # Greedy: the top token at each position is the one generated.
    assert "".join(position[0]["token"] for position in top) == asked.generated_text


def test_vllm_rows_carry_logprobs_and_regex_as_vllm_wants_them():
    """What Ray's vLLM stage receives: `structured_outputs` from `regex` (null where a row
    has none), `logprobs` only when a row asks, seeds dropped when none is set; and vLLM's
    per-token logprob dicts come back as the contract's [{token, logprob}] lists."""
    from deliberate_ray.engines.vllm import _prepare, top_logprobs

    cfg = SamplingConfig(max_tokens=4, temperature=0.0)
    rows = [
        sampling_params(cfg, regex=" (yes|no)", logprobs=3),
        sampling_params(cfg),
        sampling_params(cfg) | {"max_tokens": 0},
    ]
    batch = pa.table({"sampling_params": pa.array(rows, SAMPLING_PARAMS)})
    out = _prepare(batch)
    params = out.column("sampling_params").to_pylist()
    assert params[0]["structured_outputs"] == {"regex": " (yes|no)"} and params[0]["logprobs"] == 3
    assert params[1]["structured_outputs"] is None and params[1]["logprobs"] == 0
    assert params[2]["max_tokens"] == 1 and out.column("_max_tokens").to_pylist() == [4, 4, 0]
    assert all("seed" not in p and "regex" not in p for p in params)
    plain = _prepare(pa.table({"sampling_params": pa.array([rows[1]], SAMPLING_PARAMS)}))
    assert set(plain.column("sampling_params").to_pylist()[0]) == {
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "repetition_penalty",
    }
    vllm_positions = [
        {
            7: {"logprob": -0.1, "rank": 1, "decoded_token": " 8"},
            3: {"logprob": -2.5, "rank": 2, "decoded_token": " 7"},
        }
    ]
    assert top_logprobs(vllm_positions) == [
        [{"token": " 8", "logprob": -0.1}, {"token": " 7", "logprob": -2.5}]
    ]
    assert top_logprobs(None) is None


def test_http_payload_asks_for_logprobs_and_regex_and_reads_them_back():
    from deliberate_ray.engines.http import payload, response_output

    cfg = EngineConfig(kind="http", base_url="http://127.0.0.1:1/v1", model="m")
    sp = sampling_params(SamplingConfig(max_tokens=3, temperature=0.0), logprobs=2, regex="[0-9]")
    body = payload({"messages": chat("Score?"), "sampling_params": sp}, cfg)
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["structured_outputs"] == {"regex": "[0-9]"}
    plain = payload(
        {"messages": chat("Hi"), "sampling_params": sampling_params(SamplingConfig())}, cfg
    )
    assert "logprobs" not in plain and "structured_outputs" not in plain
    assert "repetition_penalty" not in plain  # an OpenAI server may not know the field
    penalised = sampling_params(SamplingConfig(repetition_penalty=1.1))
    assert (
        payload({"messages": chat("Hi"), "sampling_params": penalised}, cfg)["repetition_penalty"]
        == 1.1
    )
    response = {
        "choices": [
            {
                "message": {"content": "7"},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [
                        {
                            "token": "7",
                            "logprob": -0.2,
                            "top_logprobs": [
                                {"token": "7", "logprob": -0.2},
                                {"token": "6", "logprob": -1.9},
                            ],
                        }
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1},
    }
    out = response_output(response, 3)
    assert out["top_logprobs"] == [
        [{"token": "7", "logprob": -0.2}, {"token": "6", "logprob": -1.9}]
    ]


def test_cpu_kv_cache_is_an_engine_argument_in_fractions_of_a_gib():
    """vLLM's VLLM_CPU_KVCACHE_SPACE takes whole GiB and overrides the engine argument, so
    the CPU environment leaves it out and `kv_cache_gib` becomes kv_cache_memory_bytes."""
    from deliberate_ray.config import ServeConfig
    from deliberate_ray.engines.select import vllm_cpu_env_vars
    from deliberate_ray.engines.vllm import engine_kwargs

    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm_cpu_env_vars("0-1")
    kwargs = engine_kwargs(EngineConfig(kind="vllm", kv_cache_gib=0.25))
    assert kwargs["kv_cache_memory_bytes"] == 2**28
    override = engine_kwargs(
        EngineConfig(kind="vllm", engine_kwargs={"kv_cache_memory_bytes": 123})
    )
    assert override["kv_cache_memory_bytes"] == 123
    assert ServeConfig(kv_cache_gib=0.5).kv_cache_gib == 0.5
    with pytest.raises(ValueError):
        EngineConfig(kv_cache_gib=0)


def test_kept_columns_cross_the_vllm_processor_whatever_their_nulls():
    """Ray's vLLM processor rebuilds blocks with types inferred per block; a kept struct
    column that is null in every row of one block must still come back as it went in."""
    from deliberate_ray.engines.vllm import CARRY, _carry, _uncarry

    checks = pa.struct([("ok", pa.bool_()), ("ids", pa.list_(pa.string()))])
    params = pa.array([sampling_params(SamplingConfig())] * 2, SAMPLING_PARAMS)
    batch = pa.table(
        {
            "id": ["a", "b"],
            "checks": pa.array([None, {"ok": True, "ids": ["VIO-1"]}], checks),
            "messages": pa.array([chat("Hi")] * 2, MESSAGES),
            "sampling_params": params,
        }
    )
    sent = _carry(batch, ["id", "checks"])
    assert set(sent.schema.names) == {"messages", "sampling_params", "_max_tokens", CARRY}
    engine = (
        sent.append_column("generated_text", pa.array(["x", "y"]))
        .append_column("num_input_tokens", pa.array([3, 4]))
        .append_column("num_generated_tokens", pa.array([1, 1]))
    )
    back = _uncarry(engine, ["id", "checks"]).to_pylist()
    assert [r["id"] for r in back] == ["a", "b"]
    assert back[0]["checks"] is None and back[1]["checks"] == {"ok": True, "ids": ["VIO-1"]}
    assert back[1]["generated_text"] == "y" and back[1]["finish_reason"] == "stop"


@pytest.mark.ray
def test_http_key_is_no_actor_argument(ray_session, monkeypatch):
    """The processor's headers and its session factory's arguments hold no key: only an
    object-store reference that the actor's session reads (issue: secrets never travel as
    actor arguments)."""
    from deliberate_ray.engines.http import processor_config

    monkeypatch.setenv("STUB_KEY", "sk-secret-123")
    cfg = EngineConfig(kind="http", base_url="http://x/v1", api_key_env="STUB_KEY")
    pc = processor_config(cfg)
    assert "sk-secret-123" not in str(pc.headers)
    factory = pc.session_factory
    assert "sk-secret-123" not in repr(factory.args) + repr(factory.keywords)
    ref = factory.args[1]
    assert ray_session.get(ref) == "sk-secret-123"
