"""A competent optimizer, simulated: an OpenAI-compatible chat server that answers the
pipeline's own optimizer requests with known good versions, or with the failures real
models produce.

No model stronger than the bundled 135M can be installed here, so the closed-loop benchmark
serves this stand-in on 127.0.0.1 and points the pipeline at it with
``MIDDO_OPTIMIZER_BACKEND=openai``, exactly as it would reach vLLM. Everything else (training,
signals, the gate, merge, rollback) runs for real.

What it answers, by request:

- **the style probe** (a stepwise rewrite of a fixed task): always a well-formed stepwise
  answer, since a strong model follows the format; the failures below are content failures;
- **a prompt step** (simplify, rewrite or extend; stepwise, or the direct style): it finds the
  flagged sample from the text between ``<<<`` and ``>>>`` and decides, seeded by (seed,
  operation, sample, the request's seed): with probability ``p`` the known good version
  (``Oracle.good``), otherwise one of ``FAILURES``, drawn uniformly;
- **a response step**: the answer that belongs to the prompt it issued (the good answer, or
  the failure's answer); a prompt it never issued gets a plain generic answer.

A flagged sample with **no known good version** (a clean row flagged by mistake, or a row an
earlier round added) gets, with probability ``p``, what a competent model does with a sample
that is already fine: asked to simplify or rewrite, it rewords the prompt lightly and keeps
the correct answer (``neutral``: neither a repair nor junk); asked to extend, it writes a new
task of the same category, taken from a reserve of seed rows that are not in the data
(``neutral`` too). The stand-in cannot know a better version of a good sample, and inventing
one would credit the loop with repairs it did not make.

Failures (``FAILURES``): ``truncated`` (the response cut at the token limit, finish reason
``length``), ``off_topic`` (a correct sample on another subject), ``reworded_origin`` (the
flagged sample in other words, its answer as it was), ``refusal`` (a refusal, or an assistant
pleasantry before the answer), ``unchanged`` (the flagged prompt returned as it was),
``wrong_answer`` (the good prompt with a fluent wrong answer).

Every decision is logged (``StandinServer.decisions``) with the text it returned, so a
benchmark can tell which accepted refinement was a repair and which was junk. Token usage is
reported like a real server (whitespace tokens of the request and of the answer).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from middo_pipeline.core.optimizer.prompts import _DIRECT_SYSTEM, _RESPONSE_SYSTEM, _STEPWISE_SYSTEM, FINAL_MARKER
from middo_pipeline.core.optimizer.style import PROBE_TASK

FAILURES = ("truncated", "off_topic", "reworded_origin", "refusal", "unchanged", "wrong_answer")
OPERATIONS = ("simplified", "rewritten", "extended")
MODEL_NAME = "competent-standin"

# light rewordings of a prompt (what a model asked to rewrite an already fine prompt writes)
_REWORDINGS = (
    lambda s: "Please " + s[0].lower() + s[1:],
    lambda s: s.rstrip(".?!") + ". Answer clearly.",
    lambda s: "Could you " + s[0].lower() + s[1:].rstrip(".?!") + "?",
    lambda s: s + " Be concise.",
)
_GENERIC_ANSWER = "Here is a clear and complete answer to the request, with the key points stated directly."


def norm(text: str) -> str:
    """How the stand-in matches a sample's text: whitespace-insensitive."""
    return " ".join(str(text or "").split())


@dataclass(frozen=True)
class Sample:
    instruction: str  # the prompt, any input folded in
    output: str
    category: str = ""


@dataclass
class Oracle:
    """What the stand-in knows, keyed by the flagged sample's prompt as the pipeline sends it
    (``norm(prompt_text(instruction, input))``).

    ``good``: the known good version of a defective row (replaces it). ``extensions``: a good
    new task for a sparse row. ``originals``: every row of the data (prompt -> its sample), for
    the reworded and unchanged failures and the neutral answers. ``reserve``: correct samples not
    in the data, by category (new tasks for extensions without a written one; off-topic
    answers)."""

    good: dict[str, Sample] = field(default_factory=dict)
    extensions: dict[str, Sample] = field(default_factory=dict)
    originals: dict[str, Sample] = field(default_factory=dict)
    reserve: list[Sample] = field(default_factory=list)

    def known(self, prompt: str, operation: str) -> Sample | None:
        key = norm(prompt)
        return self.extensions.get(key) if operation == "extended" else self.good.get(key)


def _rng(*parts) -> random.Random:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _wrong(sample: Sample, origin: Sample | None, reserve: list[Sample], rng: random.Random) -> str:
    """A fluent answer that is wrong for ``sample``: its numbers changed when it has any; else
    the flagged sample's own answer when that differs (a wrong fact stays wrong); else the
    answer of another sample of the same category."""
    if re.search(r"\d", sample.output):
        return re.sub(r"\d", lambda m: str((int(m.group()) + rng.randrange(1, 9)) % 10), sample.output)
    if origin is not None and norm(origin.output) != norm(sample.output):
        return origin.output
    same = [s for s in reserve if s.category == sample.category and norm(s.output) != norm(sample.output)]
    return rng.choice(same or reserve).output if (same or reserve) else "The answer is the opposite of what is asked."


def _cut(text: str) -> str:
    words = text.split()
    return " ".join(words[: max(1, len(words) // 2)])


@dataclass
class Answer:
    kind: str  # "good" | "neutral" | one of FAILURES
    prompt_text: str  # the prompt step's completion
    prompt_finish: str = "stop"
    new_prompt: str | None = None  # the prompt the completion ends with (None: none parseable)
    response: str | None = None
    response_finish: str = "stop"


def _stepwise(operation: str, new_prompt: str) -> str:
    steps = {
        "simplified": "1. Ways to simplify - narrow the scope, use shorter material.\n"
        "2. Plan - keep the skill, make it learnable.\n3. Rewrite - done below.\n4. Review - clear and easier.",
        "rewritten": "1. Problems - the prompt or its answer is faulty or unclear.\n"
        "2. Plan - state the task plainly and correctly.\n3. Rewrite - done below.\n4. Check - accurate and answerable.",
        "extended": "1. Topic - the subject of the core prompt.\n2. Gaps - related questions not yet covered.\n"
        "3. Idea - one new question on that subject.\n4. Draft and check - self-contained and answerable.",
    }[operation]
    return f"{steps}\n\n{FINAL_MARKER}\n{new_prompt}"


class Standin:
    """Decides the answer to each optimizer request (no HTTP here: ``StandinServer`` serves it)."""

    def __init__(self, oracle: Oracle, p: float, seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.oracle, self.p, self.seed = oracle, float(p), int(seed)
        self.responses: dict[str, tuple[str, str]] = {}  # issued prompt -> (response, finish reason)
        self.decisions: list[dict] = []
        self.lock = threading.Lock()

    # -- the prompt step ---------------------------------------------------------------------
    def decide(self, operation: str, source: str, request_seed) -> Answer:
        o = self.oracle
        origin = o.originals.get(norm(source)) or Sample(source, "")
        good = o.known(source, operation)
        rng = _rng(self.seed, operation, norm(source), request_seed)
        if rng.random() < self.p:
            if good is not None:
                return self._answer("good", operation, good.instruction, good.output)
            return self._neutral(operation, origin, rng)
        failure = rng.choice(FAILURES)
        target = good or origin
        if failure == "truncated":
            return self._answer(failure, operation, target.instruction, _cut(target.output), response_finish="length")
        if failure == "off_topic":
            pool = [s for s in o.reserve if s.category != origin.category] or o.reserve
            s = rng.choice(pool) if pool else Sample("Name three primary colours.", "Red, yellow and blue.")
            return self._answer(failure, operation, s.instruction, s.output)
        if failure == "reworded_origin":
            return self._answer(failure, operation, rng.choice(_REWORDINGS)(norm(origin.instruction)), origin.output)
        if failure == "refusal":
            if rng.random() < 0.5:
                refusal = "I'm sorry, but I can't help with rewriting this prompt."
                return Answer(failure, refusal)
            return self._answer(
                failure, operation, target.instruction, "Absolutely! I'd be happy to help. " + target.output
            )
        if failure == "unchanged":
            return self._answer(failure, operation, norm(source), origin.output)
        return self._answer(failure, operation, target.instruction, _wrong(target, origin, o.reserve, rng))

    def _neutral(self, operation: str, origin: Sample, rng: random.Random) -> Answer:
        if operation == "extended":
            same = [s for s in self.oracle.reserve if s.category == origin.category] or self.oracle.reserve
            if same:
                s = rng.choice(same)
                return self._answer("neutral", operation, s.instruction, s.output)
        return self._answer("neutral", operation, rng.choice(_REWORDINGS)(norm(origin.instruction)), origin.output)

    def _answer(self, kind, operation, new_prompt, response, response_finish="stop") -> Answer:
        return Answer(kind, _stepwise(operation, new_prompt), "stop", new_prompt, response, response_finish)

    # -- a whole request -----------------------------------------------------------------------
    def complete(self, body: dict) -> tuple[str, str]:
        """(text, finish reason) for one chat-completions request body."""
        messages = body.get("messages") or []
        system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
        user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if system == _RESPONSE_SYSTEM:
            with self.lock:
                text, finish = self.responses.get(norm(user), (_GENERIC_ANSWER, "stop"))
            return text, finish
        if system not in (_STEPWISE_SYSTEM, _DIRECT_SYSTEM):
            return _GENERIC_ANSWER, "stop"
        operation, source = parse_request(user, stepwise=system == _STEPWISE_SYSTEM)
        if norm(source) == norm(PROBE_TASK):
            return _stepwise("rewritten", "List three practical tips for staying healthy."), "stop"
        answer = self.decide(operation, source, body.get("seed"))
        text = answer.prompt_text if system == _STEPWISE_SYSTEM else (answer.new_prompt or answer.prompt_text)
        with self.lock:
            if answer.new_prompt is not None:
                self.responses[norm(answer.new_prompt)] = (answer.response, answer.response_finish)
            self.decisions.append(
                {
                    "operation": operation,
                    "source": norm(source),
                    "request_seed": body.get("seed"),
                    "kind": answer.kind,
                    "new_prompt": answer.new_prompt,
                    "response": answer.response,
                }
            )
        del max_tokens  # a competent model finishes its prompt step well within the limit
        return text, answer.prompt_finish


_BLOCK_RE = re.compile(r"<<<\n(.*?)\n>>>", re.DOTALL)
_TASK_RE = re.compile(r"Task: (.*?)(?:\n\nBegin your answer with .*)?\Z", re.DOTALL)
_LISTING_RE = re.compile(r"^1\. (.*)$", re.MULTILINE)


def parse_request(user: str, stepwise: bool) -> tuple[str, str]:
    """(operation, the flagged sample's prompt) of a prompt-step request, in either style."""
    if stepwise:
        if "thinly covered region" in user:
            operation = "extended"
        elif "too hard to be learned" in user:
            operation = "simplified"
        else:
            operation = "rewritten"
        m = _BLOCK_RE.search(user)
        return operation, m.group(1) if m else user
    if user.startswith("Here are some tasks:"):
        m = _LISTING_RE.search(user)
        return "extended", m.group(1) if m else user
    operation = "simplified" if user.startswith("Rewrite this task as an easier") else "rewritten"
    m = _TASK_RE.search(user)
    return operation, m.group(1) if m else user


def _tokens(text: str) -> int:
    return len(str(text).split())


class _Handler(BaseHTTPRequestHandler):
    standin: Standin  # set on the subclass

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "bench"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._send(400, {"error": {"message": "invalid JSON"}})
            return
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        text, finish = self.standin.complete(body)
        prompt_tokens = sum(_tokens(m.get("content", "")) for m in body.get("messages") or [])
        completion_tokens = _tokens(text)
        self._send(
            200,
            {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", MODEL_NAME),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )


class StandinServer:
    """The stand-in on 127.0.0.1 (a free port), in a daemon thread; ``base_url`` for the pipeline."""

    def __init__(self, standin: Standin):
        self.standin = standin
        self._server: ThreadingHTTPServer | None = None

    @property
    def decisions(self) -> list[dict]:
        return self.standin.decisions

    def start(self) -> StandinServer:
        handler = type("StandinHandler", (_Handler,), {"standin": self.standin})
        with socket.socket() as s:  # a free port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        self._server.request_queue_size = 64
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> StandinServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """The environment that points the pipeline at this server."""
        return {
            "MIDDO_OPTIMIZER_BACKEND": "openai",
            "MIDDO_OPTIMIZER_BASE_URL": self.base_url,
            "MIDDO_OPTIMIZER_MODEL": MODEL_NAME,
        }
