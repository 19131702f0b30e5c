"""Alternatives to the refusal classifier, compared by 5-fold cross-validation on the *train*
split of data/graders/refusal_labels.jsonl only (the held-out split is not read).

- `linear`: the shipped model (hashed n-grams + rule features, logistic regression);
- `linear+minilm`: the same plus the MiniLM embedding of the reply's first 30 words (32 tokens);
- `linear+chars`: the same plus hashed character 3-5-grams of the reply's first 300 characters;
- `linear-binary-rule`: the shipped model, but a reply is a refusal when P(compliance) < 0.5
  (then the likelier of the two refusal labels), instead of the most probable label;
- `boosting`: gradient-boosted trees on the rule features alone;
- `stacking`: boosted trees on the rule features + out-of-fold n-gram probabilities;
- `minilm-finetuned` (fold 0 only, with `linear` on the same fold): all-MiniLM-L6-v2
  fine-tuned end to end on (prompt, reply), 4 epochs.

    .venv/bin/python bench/refusal_alternatives.py
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np

from deliberate_ray.graders.refusal import (
    DEFAULT_C,
    LABELS,
    RULE_NAMES,
    features,
    is_refusal,
    load_labelled,
    normalise,
)

OUT = Path(__file__).resolve().parent / "results" / "refusal_alternatives.json"


def scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    pairs = zip(pred, y, strict=True)
    binary = np.mean([is_refusal(LABELS[p]) == is_refusal(LABELS[t]) for p, t in pairs])
    return {"binary": round(float(binary), 4), "three_way": round(float(np.mean(pred == y)), 4)}


def char_grams(rows, head: int = 300, dim: int = 1 << 15):
    """Hashed character 3-5-grams of each reply's opening, each row of unit length."""
    import zlib

    import scipy.sparse as sp

    data: list[float] = []
    cols: list[int] = []
    indptr = [0]
    for r in rows:
        text = f" {normalise(r.completion).lower()[:head]} "
        grams = {text[i : i + k] for k in (3, 4, 5) for i in range(len(text) - k + 1)}
        hashed = sorted({zlib.crc32(g.encode()) % dim for g in grams})
        cols += hashed
        data += [1 / np.sqrt(len(hashed))] * len(hashed)
        indptr.append(len(cols))
    return sp.csr_matrix((np.array(data, np.float32), cols, indptr), shape=(len(rows), dim))


def finetune_fold(rows, y, tr, te) -> dict[str, float]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from deliberate_ray.graders.embeddings import minilm_dir

    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))

    def enc(idx):
        return tok(
            [normalise(rows[i].prompt)[:200] for i in idx],
            [normalise(rows[i].completion) or "(empty)" for i in idx],
            truncation="only_second",
            max_length=96,
            padding=True,
            return_tensors="pt",
        )

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = AutoModel.from_pretrained(str(minilm_dir()))
            self.head = torch.nn.Linear(384, len(LABELS))

        def forward(self, b):
            h = self.enc(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            return self.head((h * m).sum(1) / m.sum(1))

    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    for _ in range(4):
        order = list(tr)
        rng.shuffle(order)
        model.train()
        for i in range(0, len(order), 16):
            idx = order[i : i + 16]
            loss = torch.nn.functional.cross_entropy(model(enc(idx)), torch.tensor(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = np.concatenate(
            [model(enc(te[i : i + 64])).argmax(1).numpy() for i in range(0, len(te), 64)]
        )
    return scores(pred, y[te])


def main() -> None:
    import scipy.sparse as sp
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from deliberate_ray.graders.embeddings import MiniLMEmbedder

    rows = [r for r in load_labelled() if r.split == "train"]
    y = np.array([LABELS.index(r.label) for r in rows])
    x = features([(r.prompt, r.completion) for r in rows]).tocsr()
    rules = x[:, -len(RULE_NAMES) :].toarray()
    grams = x[:, : -len(RULE_NAMES)]
    embedder = MiniLMEmbedder()
    openings = [" ".join(normalise(r.completion).split()[:30]) or "(empty)" for r in rows]
    import deliberate_ray.graders.embeddings as emb_mod

    emb_mod.MAX_TOKENS = 32
    t0 = time.perf_counter()
    emb = embedder.embed(openings, batch_size=64)
    emb_rate = len(rows) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    features([(r.prompt, r.completion) for r in rows])
    feat_rate = len(rows) / (time.perf_counter() - t0)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(rules, y))

    def lr() -> LogisticRegression:
        return LogisticRegression(C=DEFAULT_C, max_iter=5000)

    def boost() -> HistGradientBoostingClassifier:
        return HistGradientBoostingClassifier(
            max_iter=200, learning_rate=0.05, max_depth=3, random_state=0
        )

    with_emb = sp.hstack([x, sp.csr_matrix(emb)]).tocsr()
    with_chars = sp.hstack([x, char_grams(rows)]).tocsr()
    doc: dict = {"train_rows": len(rows), "C": DEFAULT_C, "cv5": {}}
    names = ("linear", "linear+minilm", "linear+chars", "linear-binary-rule", "boosting")
    for name in (*names, "stacking"):
        pred = np.zeros(len(rows), int)
        for tr, te in folds:
            if name == "linear":
                pred[te] = lr().fit(x[tr], y[tr]).predict(x[te])
            elif name == "linear+minilm":
                pred[te] = lr().fit(with_emb[tr], y[tr]).predict(with_emb[te])
            elif name == "linear+chars":
                pred[te] = lr().fit(with_chars[tr], y[tr]).predict(with_chars[te])
            elif name == "linear-binary-rule":
                p = lr().fit(x[tr], y[tr]).predict_proba(x[te])
                pred[te] = np.where(p[:, 0] >= 0.5, 0, 1 + p[:, 1:].argmax(1))
            elif name == "boosting":
                pred[te] = boost().fit(rules[tr], y[tr]).predict(rules[te])
            else:
                inner = cross_val_predict(lr(), grams[tr], y[tr], cv=5, method="predict_proba")
                top = lr().fit(grams[tr], y[tr])
                model = boost().fit(np.hstack([rules[tr], inner]), y[tr])
                pred[te] = model.predict(np.hstack([rules[te], top.predict_proba(grams[te])]))
        doc["cv5"][name] = scores(pred, y)
        print(name, doc["cv5"][name])
    doc["rows_per_s"] = {"features": round(feat_rate), "minilm_opening": round(emb_rate)}
    tr, te = folds[0]
    doc["fold0"] = {
        "linear": scores(lr().fit(x[tr], y[tr]).predict(x[te]), y[te]),
        "minilm-finetuned": finetune_fold(rows, y, tr, te),
    }
    print("fold 0:", doc["fold0"], "rows/s:", doc["rows_per_s"])
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
