"""The slice of the OpenAI chat API that we serve: request validation, responses, errors,
and the API key check (shared by both Serve apps).

Validation is strict (no "5" for 5, no true for 1) and every rejection is a 4xx with the
OpenAI error body `{"error": {"message", "type", "param", "code"}}`, so clients and the eval
loop can tell a bad request from a broken server.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_N = 8
MAX_STOP = 4
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def key_digest(key: str) -> str:
    """sha256 of an API key: replicas get the digest, never the key (deployment arguments are
    stored in Ray's GCS)."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_api_key(authorization: str, key_sha256: str | None) -> None:
    """401 unless the `Authorization` header is `Bearer <key>` for the key's digest (no digest:
    no authentication). Compared in constant time."""
    if key_sha256 is None:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key_digest(token.strip()), key_sha256):
        raise APIError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Unknown OpenAI fields are ignored; known ones are checked.

    A trailing assistant message is a prefill: the model continues it, and the response
    holds only the continuation.
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    seed: int | None = None
    stream: bool = False

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("messages must contain at least one message with role 'user'")
        return messages

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: Any) -> Any:
        """OpenAI accepts one string, a list of strings or null."""
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, stop: list[str]) -> list[str]:
        if any(not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, stream: bool) -> bool:
        if stream:
            raise ValueError("streaming is not supported by this server; send stream=false")
        return stream


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(exc: ValidationError) -> APIError:
    """The first problem, named by its field path, as a 400."""
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    more = len(exc.errors()) - 1
    message = f"{param}: {err['msg']}" if param else err["msg"]
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return APIError(400, message, param=param, code="invalid_value")


def split_reasoning(text: str) -> tuple[str | None, str]:
    """`<think>...</think>` -> (reasoning, content). Handles a template that opened the
    think block in the prompt (only `</think>` in the text) and an unclosed block (cut off)."""
    open_at = text.find(THINK_OPEN)
    close_at = text.find(THINK_CLOSE)
    if open_at < 0 and close_at < 0:
        return None, text.strip()
    if close_at < 0:  # opened, never closed: all of it is reasoning
        return text[open_at + len(THINK_OPEN) :].strip(), ""
    start = open_at + len(THINK_OPEN) if 0 <= open_at < close_at else 0
    return text[start:close_at].strip(), text[close_at + len(THINK_CLOSE) :].strip()


def completion_response(
    model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """choices: (generated text, finish reason) per sample."""
    out = []
    for i, (text, finish) in enumerate(choices):
        reasoning, content = split_reasoning(text)
        message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        out.append({"index": i, "message": message, "finish_reason": finish})
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def models_response(models: dict[str, str]) -> dict[str, Any]:
    created = int(time.time())
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "deliberate-ray"}
        for name in models
    ]
    return {"object": "list", "data": data}


def parse_model_args(specs: list[str]) -> dict[str, str]:
    """`[NAME=]REF` items -> {name: ref}; a bare REF is named after its last path part."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, ref = spec.partition("=")
        if not sep:
            ref = spec
            name = re.split(r"[/:]", spec.rstrip("/"))[-1]
        if not ref:
            raise ValueError(f"--model {spec!r}: empty model reference (use [NAME=]REF)")
        if not MODEL_NAME.match(name):
            raise ValueError(
                f"--model {spec!r}: name {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
                " (give one with NAME=REF)"
            )
        if name in models:
            raise ValueError(f"--model {spec!r}: the name {name!r} is used twice")
        models[name] = ref
    if not models:
        raise ValueError("give at least one --model [NAME=]REF")
    return models
