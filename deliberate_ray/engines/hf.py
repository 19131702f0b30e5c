"""Batched transformers generation for CPU (and GPU without vLLM), shared by Data and Serve.

One `generate(requests)` call runs all requests as one left-padded batch with a KV cache.
Rows may differ in sampling params, stop strings, max tokens and seeds. On CPU the prompt
prefill dominates (the spec is ~1k tokens), so identical prompts (the n samples of one
prompt) are prefilled once, the token prefix shared by all prompts of the batch (chat
template, spec overview) only once, and finished rows leave the batch.
"""

from __future__ import annotations

import functools
import logging
import secrets
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from deliberate_ray.engines.rows import SKIPPED, error_output, split_prefill, with_outputs
from deliberate_ray.models import load_model, load_tokenizer

if TYPE_CHECKING:
    from deliberate_ray.config import EngineConfig

log = logging.getLogger(__name__)

# A shared prefix shorter than this is not worth a separate forward pass.
MIN_SHARED_PREFIX = 16


@dataclass
class GenRequest:
    messages: list[dict[str, str]]
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Text appended after the generation prompt (assistant-turn prefill); generated_text
    # excludes it: callers know what they prefilled.
    prefill: str | None = None
    # The n most likely tokens at each generated position, with their log probabilities.
    logprobs: int | None = None
    # > 1 makes every token already in the prompt or the reply less likely (vLLM's and
    # transformers' rule: positive logits divided by it, negative ones multiplied).
    repetition_penalty: float = 1.0


@dataclass
class GenResult:
    generated_text: str
    num_input_tokens: int
    num_generated_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_tokens)
    top_logprobs: list[list[dict[str, Any]]] | None = None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no GPU; use 'auto' or 'cpu'")
    return device


@dataclass
class _Row:
    """Decoding state of one request."""

    req: GenRequest
    num_input_tokens: int
    generator: Any  # torch.Generator
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    top_logprobs: list[list[dict[str, Any]]] | None = None
    # Prompt and reply token ids, for the repetition penalty.
    seen: set[int] = field(default_factory=set)


class HFGenerator:
    """A causal LM plus its tokenizer, generating chat completions in batches."""

    def __init__(
        self,
        model_ref: str,
        device: str = "auto",
        dtype: str = "auto",
        torch_threads: int | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ):
        import torch

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.model_ref = model_ref
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(model_ref)
        self.model = load_model(model_ref, dtype=dtype, device=self.device)
        self.end_ids = self._end_of_turn_ids()
        self.chat_template_kwargs = chat_template_kwargs or {}
        self.max_positions: int | None = getattr(self.model.config, "max_position_embeddings", None)

    def _end_of_turn_ids(self) -> set[int]:
        """EOS ids from the tokenizer and generation config, plus a ChatML turn opener."""
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        # A chat model that opens a new turn has finished its own.
        im_start = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        if isinstance(im_start, int) and im_start != self.tokenizer.unk_token_id:
            ids.add(im_start)
        return ids

    def prompt_text(self, req: GenRequest) -> str:
        text = self.tokenizer.apply_chat_template(
            req.messages, tokenize=False, add_generation_prompt=True, **self.chat_template_kwargs
        )
        return text + (req.prefill or "")

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        import torch

        if not requests:
            return []
        with torch.inference_mode():
            return self._generate(requests)

    # ------------------------------------------------------------------ internals

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float()

    def _prefill(self, prompts: list[list[int]]) -> tuple[Any, Any, Any, Any]:
        """Prefill unique prompts; returns (last logits, cache, 2D mask, next positions)."""
        import torch
        from transformers import DynamicCache

        dev = self.device
        shared = _common_prefix_len(prompts)
        shared = min(shared, min(len(p) for p in prompts) - 1)  # keep >= 1 own token per row
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        cache = DynamicCache(config=self.model.config)
        n = len(prompts)
        if shared:
            prefix = torch.tensor([prompts[0][:shared]], device=dev)
            self._forward(
                prefix,
                torch.ones_like(prefix),
                torch.arange(shared, device=dev)[None],
                cache,
            )
            cache.reorder_cache(torch.zeros(n, dtype=torch.long, device=dev))
        suffixes = [p[shared:] for p in prompts]
        width = max(len(s) for s in suffixes)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes], device=dev)
        own = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=dev)
        mask = torch.cat([torch.ones(n, shared, dtype=own.dtype, device=dev), own], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, mask, positions[:, shared:], cache)
        return logits, cache, mask, positions[:, -1] + 1

    def _generate(self, requests: list[GenRequest]) -> list[GenResult]:
        import torch

        dev = self.device
        texts = [self.prompt_text(r) for r in requests]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for r, e in zip(requests, encoded, strict=True):
            if self.max_positions and len(e) + r.max_tokens > self.max_positions:
                raise ValueError(
                    f"prompt of {len(e)} tokens + max_tokens {r.max_tokens} exceeds the "
                    f"model's {self.max_positions} positions"
                )
        unique: dict[tuple[int, ...], int] = {}
        which = [unique.setdefault(tuple(e), len(unique)) for e in encoded]
        logits, cache, mask, next_pos = self._prefill([list(u) for u in unique])
        idx = torch.tensor(which, device=dev)
        cache.reorder_cache(idx)
        logits, mask, next_pos = logits[idx], mask[idx], next_pos[idx]

        rows = [
            _Row(r, len(e), _generator(r.seed, dev), seen=set(e) if penalized(r) else set())
            for r, e in zip(requests, encoded, strict=True)
        ]
        active = list(range(len(rows)))
        while True:
            chosen = self._sample(logits, [rows[i] for i in active])
            for i, tok in zip(active, chosen, strict=True):
                self._advance(rows[i], tok)
            keep = [k for k, i in enumerate(active) if rows[i].finish_reason is None]
            if not keep:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, device=dev)
                cache.reorder_cache(sel)
                mask, next_pos = mask[sel], next_pos[sel]
                active = [active[k] for k in keep]
            ids = torch.tensor([[rows[i].tokens[-1]] for i in active], device=dev)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            logits = self._forward(ids, mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        return [self._result(r) for r in rows]

    def _sample(self, logits: Any, rows: list[_Row]) -> list[int]:
        """Greedy rows take the argmax; others sample with temperature, top-p, own generator.
        Rows that ask for logprobs get the top n of the model's distribution (before
        temperature, as vLLM reports them)."""
        import torch

        wanting = [k for k, r in enumerate(rows) if r.req.logprobs]
        if wanting:
            logp = torch.log_softmax(logits[wanting], dim=-1)
            for k, lp in zip(wanting, logp, strict=True):
                values, ids = lp.topk(rows[k].req.logprobs)
                tokens = self.tokenizer.convert_ids_to_tokens(ids.tolist())
                words = [self.tokenizer.convert_tokens_to_string([t]) for t in tokens]
                top = [
                    {"token": w, "logprob": float(v)} for w, v in zip(words, values, strict=True)
                ]
                rows[k].top_logprobs = [*(rows[k].top_logprobs or []), top]
        logits = _penalize(logits, rows)
        greedy = logits.argmax(-1).tolist()
        if all(r.req.temperature == 0 for r in rows):
            return greedy
        t = torch.tensor([max(r.req.temperature, 1e-5) for r in rows], device=logits.device)
        top_p = torch.tensor([r.req.top_p for r in rows], device=logits.device)
        probs = torch.softmax(logits / t[:, None], dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) > top_p[:, None]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        out = []
        for k, row in enumerate(rows):
            if row.req.temperature == 0:
                out.append(greedy[k])
                continue
            pick = torch.multinomial(sorted_p[k], 1, generator=row.generator)
            out.append(int(order[k, pick]))
        return out

    def _advance(self, row: _Row, token: int) -> None:
        row.tokens.append(token)
        if penalized(row.req):
            row.seen.add(token)
        if token in self.end_ids:
            row.finish_reason = "stop"
        elif row.req.stop and _tail_has_stop(self.tokenizer, row.tokens, row.req.stop):
            row.finish_reason = "stop"
        elif len(row.tokens) >= row.req.max_tokens:
            row.finish_reason = "length"

    def _result(self, row: _Row) -> GenResult:
        ids = row.tokens[:-1] if row.tokens and row.tokens[-1] in self.end_ids else row.tokens
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((p for p in (text.find(s) for s in row.req.stop) if p >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        return GenResult(
            generated_text=text,
            num_input_tokens=row.num_input_tokens,
            num_generated_tokens=len(row.tokens),
            finish_reason=row.finish_reason or "length",
            top_logprobs=row.top_logprobs,
        )


def _generator(seed: int | None, device: str) -> Any:
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else secrets.randbits(63))
    return g


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _tail_has_stop(tokenizer: Any, tokens: list[int], stops: list[str]) -> bool:
    """Decode just enough recent tokens to contain any stop string that the last token ended."""
    width = max(len(s) for s in stops) + 4
    tail = tokenizer.decode(tokens[-width:], skip_special_tokens=True)
    return any(s in tail for s in stops)


class HFEngineActor:
    """Ray Data actor (`map_batches` + `ActorPoolStrategy`): one model per actor, batches of
    engine-contract rows in, the same rows with generation outputs out."""

    def __init__(self, engine: dict[str, Any], keep: list[str]):
        from deliberate_ray.config import EngineConfig

        cfg = EngineConfig.model_validate(engine)
        self.keep = keep
        self.generator = HFGenerator(
            cfg.model, cfg.device, cfg.dtype, cfg.torch_threads, cfg.chat_template_kwargs
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["messages", "sampling_params"]).to_pylist()
        outputs: list[dict[str, Any]] = [SKIPPED] * len(rows)
        todo = [i for i, r in enumerate(rows) if r["sampling_params"]["max_tokens"] > 0]
        done = self._run([request_from_row(rows[i]) for i in todo])
        for i, out in zip(todo, done, strict=True):
            outputs[i] = out
        return with_outputs(batch, self.keep, outputs)

    def _run(self, requests: list[GenRequest]) -> list[dict[str, Any]]:
        """Generate a batch; if it fails, retry row by row so one bad row fails alone."""
        try:
            return [asdict(r) | {"engine_error": None} for r in self.generator.generate(requests)]
        except (ValueError, RuntimeError) as e:
            if len(requests) == 1:
                log.warning("engine error: %s", e)
                return [error_output(f"{type(e).__name__}: {e}")]
            return [out for r in requests for out in self._run([r])]


def penalized(req: GenRequest) -> bool:
    return req.repetition_penalty != 1


def _penalize(logits: Any, rows: list[_Row]) -> Any:
    """The repetition penalty of each row that asks for one, on the tokens it has seen."""
    import torch

    if not any(penalized(r.req) for r in rows):
        return logits
    logits = logits.clone()
    for k, row in enumerate(rows):
        p = row.req.repetition_penalty
        if not penalized(row.req) or not row.seen:
            continue
        ids = torch.tensor(sorted(row.seen), device=logits.device)
        picked = logits[k, ids]
        logits[k, ids] = torch.where(picked > 0, picked / p, picked * p)
    return logits


def request_from_row(row: dict[str, Any]) -> GenRequest:
    messages, prefill = split_prefill(row["messages"])
    sp = row["sampling_params"]
    if sp.get("regex"):
        warn_unconstrained()
    return GenRequest(
        messages=messages,
        max_tokens=sp["max_tokens"],
        temperature=sp["temperature"],
        top_p=sp["top_p"],
        stop=sp["stop"] or [],
        seed=sp["seed"],
        prefill=prefill,
        logprobs=sp.get("logprobs"),
        repetition_penalty=sp.get("repetition_penalty") or 1.0,
    )


@functools.cache
def warn_unconstrained() -> None:
    log.warning(
        "the hf engine cannot constrain decoding to a regex: generating freely (the checks "
        "after generation still apply; vLLM honours `regex`)"
    )


def apply_hf(ds: Any, cfg: EngineConfig, keep: list[str]) -> Any:
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        HFEngineActor,
        fn_constructor_kwargs={"engine": cfg.model_dump(), "keep": keep},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
    )
