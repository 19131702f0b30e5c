"""A real OpenAI-compatible chat-completions server for tests (stdlib HTTP on a thread).

Replies come from a function of the request body, so tests get deterministic text while the
engines still speak HTTP to a socket like they would to vLLM, our Serve app or a hosted API.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StubServer:
    def __init__(self, reply: Callable[[dict[str, Any]], str], api_key: str | None = None):
        self.reply = reply
        self.api_key = api_key
        self.delay_s = 0.0  # per request: a slow endpoint, so a test can kill a run midway
        self.fail_next = 0  # the next n requests answer 500 (a server that died mid-request)
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0  # requests being answered now, and the most at once
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body | {"_auth": self.headers.get("Authorization")})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if stub.api_key and self.headers.get("Authorization") != f"Bearer {stub.api_key}":
                    return self._send(401, {"error": {"message": "bad api key"}})
                with stub._lock:
                    fail, stub.fail_next = stub.fail_next > 0, max(0, stub.fail_next - 1)
                if fail:
                    return self._send(500, {"error": {"message": "replica died"}})
                with stub._lock:
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                time.sleep(stub.delay_s)
                with stub._lock:
                    stub.in_flight -= 1
                text = stub.reply(body)[: 4 * body["max_tokens"]]  # ~4 chars per token
                tokens = max(1, len(text) // 4)
                finish = "length" if tokens >= body["max_tokens"] else "stop"
                self._send(
                    200,
                    {
                        "object": "chat.completion",
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": finish,
                            }
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": tokens},
                    },
                )

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler
