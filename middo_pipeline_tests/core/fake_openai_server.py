"""A real HTTP server that speaks enough of the OpenAI API for backend tests.

``ThreadingHTTPServer`` on 127.0.0.1, port 0, in a daemon thread. Behaviour is scripted per
test through ``FakeOpenAI.chat`` (a function of the request body and the call number) and
``models`` / ``models_status``. Every request is recorded (method, path, headers, body).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int = 200
    body: object = None  # dict -> JSON; bytes / str -> sent as is
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    content_type: str = "application/json"


def last_user(body: dict) -> str:
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            return m.get("content", "")
    return ""


def chat_ok(content: str, prompt_tokens: int = 7, completion_tokens: int = 3) -> Reply:
    return Reply(
        200,
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": "test-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        },
    )


def echo(body: dict, n: int) -> Reply:
    return chat_ok(f"echo: {last_user(body)}")


def error(status: int, message: str = "error", code: str | None = None, fast_retry: bool = True) -> Reply:
    headers = {"retry-after-ms": "5"} if fast_retry else {}
    return Reply(status, {"error": {"message": message, "type": "test", "code": code}}, headers)


@dataclass
class Call:
    method: str
    path: str
    headers: dict
    body: object


class FakeOpenAI:
    def __init__(self):
        self.chat: Callable[[dict, int], Reply] = echo
        self.models: list[str] = ["test-model"]
        self.models_status: int = 200
        self.prefix = "/v1"
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- recorded traffic --------------------------------------------------------------------
    @property
    def chat_calls(self) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.path.endswith("/chat/completions")]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    # -- life --------------------------------------------------------------------------------
    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _handle(self, method: str):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = raw
                with fake.lock:
                    fake.calls.append(Call(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    n_chat = sum(1 for c in fake.calls if c.path.endswith("/chat/completions")) - 1
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                # In flight = asked and not yet answered. The count drops *before* the reply is
                # written: once the client has read it, it may send its next request before this
                # thread gets scheduled again, and counting the tail of this handler would then
                # report one request more than the client ever had outstanding.
                answered = False

                def answer():
                    nonlocal answered
                    if not answered:
                        answered = True
                        with fake.lock:
                            fake.in_flight -= 1

                try:
                    reply = fake.route(method, self.path, body, n_chat)
                    if reply.delay:
                        time.sleep(reply.delay)
                    answer()
                    payload = reply.body
                    if isinstance(payload, (dict, list)):
                        payload = json.dumps(payload).encode()
                    elif isinstance(payload, str):
                        payload = payload.encode()
                    elif payload is None:
                        payload = b""
                    self.send_response(reply.status)
                    self.send_header("content-type", reply.content_type)
                    self.send_header("content-length", str(len(payload)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)
                finally:
                    answer()

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def route(self, method: str, path: str, body, n_chat: int) -> Reply:
        if method == "GET" and path == f"{self.prefix}/models":
            if self.models_status != 200:
                return error(self.models_status, f"models: http {self.models_status}")
            return Reply(
                200,
                {
                    "object": "list",
                    "data": [{"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in self.models],
                },
            )
        if method == "POST" and path == f"{self.prefix}/chat/completions":
            if not isinstance(body, dict):
                return error(400, "body is not JSON")
            return self.chat(body, n_chat)
        return error(404, f"no route {method} {path}", fast_retry=False)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
