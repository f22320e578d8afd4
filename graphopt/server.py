"""An OpenAI-compatible HTTP server over :class:`graphopt.runtime.batching.BatchEngine` (FastAPI on uvicorn).

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (server-sent events when
``stream`` is true), ``GET /v1/models``, ``GET /health`` and Prometheus ``GET /metrics``.

Requests run on the engine's own thread; each request's events cross to the event loop through
an ``asyncio.Queue`` (``call_soon_threadsafe``), so the loop never waits on a model run. A client
that goes away cancels its sequence, which gives its slot back after the current step. Errors
have OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``): malformed JSON or
fields 400, a prompt that does not fit the context 400 (``context_length_exceeded``), a full queue
503 with ``Retry-After``.

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client): import it through
:func:`graphopt.commands.serve.load_server`, which turns a missing one into a one-line error.
Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Literal

# Module-level: FastAPI resolves the route functions' annotations (``Request``) from these globals.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from graphopt.errors import GraphoptError
from graphopt.runtime.batching import (DEFAULT_PREFILL_CHUNK, DEFAULT_PREFIX_CACHE, BatchEngine, BatchRequest,
                                       EngineClosedError, PromptTooLongError, QueueFullError, SequenceEvent)
from graphopt.runtime.generator import encode_prompt as prompt_ids
from graphopt.runtime.sampling import Sampling

logger = logging.getLogger(__name__)

# Seconds a client is told to wait after a 503 for a full queue: about one request's decode time.
RETRY_AFTER_S = 1
# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25
# Window of the tokens/s gauge.
RATE_WINDOW_S = 10.0


def encode_prompt(engine: BatchEngine, text: str) -> list[int]:
    """Token ids of a plain prompt, with BOS where the model wants one (as ``Generator.encode_prompt``)."""
    return prompt_ids(engine.tokenizer, engine.manifest, text)


class ServerMetrics:
    """Prometheus series of one server: the engine's state read at scrape time, plus latency histograms."""

    def __init__(self, engine: BatchEngine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.engine = engine
        self.registry = CollectorRegistry()
        latency_buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
        Gauge("graphopt_queue_depth", "Requests waiting for a slot.", registry=self.registry).set_function(
            lambda: engine.queue_depth)
        Gauge("graphopt_batch_size", "Sequences holding a slot now.", registry=self.registry).set_function(
            lambda: engine.batch_size)
        Gauge("graphopt_max_batch", "Slots of the engine.", registry=self.registry).set(engine.max_batch)
        Gauge("graphopt_tokens_per_second", f"Generated tokens per second over the last {RATE_WINDOW_S:.0f} s.",
              registry=self.registry).set_function(self.tokens_per_second)
        self.step_batch = Histogram("graphopt_step_batch_size", "Sequences decoded per step.",
                                    buckets=tuple(range(1, engine.max_batch + 1)), registry=self.registry)
        self.tokens = Counter("graphopt_generated_tokens", "Tokens generated.", registry=self.registry)
        self.prompt_tokens = Counter("graphopt_prompt_tokens", "Prompt tokens prefilled.", registry=self.registry)
        self.requests = Counter("graphopt_requests", "Requests answered, by outcome.", ["outcome"],
                                registry=self.registry)
        self.time_to_first_token = Histogram("graphopt_time_to_first_token_seconds",
                                             "From a request's arrival to its first token.",
                                             buckets=latency_buckets, registry=self.registry)
        self.inter_token = Histogram("graphopt_inter_token_latency_seconds", "Time between a sequence's tokens.",
                                     buckets=latency_buckets, registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def on_step(self, batch_size: int, seconds: float) -> None:
        """The engine's step hook (engine thread)."""
        self.step_batch.observe(batch_size)

    def on_tokens(self, count: int) -> None:
        now = time.monotonic()
        self.tokens.inc(count)
        with self._lock:
            self._recent.append((now, count))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(count for _, count in self._recent) / RATE_WINDOW_S

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """The engine's own counters, read at scrape time: where its time goes, prefill against decode."""

    def __init__(self, engine: BatchEngine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        stats = self.engine.stats
        for name, help_text, value in (
                ("graphopt_prefill_seconds", "Seconds spent in prefills.", stats.prefill_s),
                ("graphopt_prefill_tokens", "Prompt tokens computed by the engine's prefills.", stats.prefill_tokens),
                ("graphopt_prefix_reused_tokens", "Prompt tokens copied from the previous prompt instead of computed.",
                 stats.prefix_reused_tokens),
                ("graphopt_decode_step_seconds", "Seconds spent in decode steps.", stats.decode_s),
                ("graphopt_decode_step_tokens", "Tokens produced by decode steps.", stats.decode_tokens)):
            yield CounterMetricFamily(name, help_text, value=value)


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class _Body(BaseModel):
    """Fields shared by both completion endpoints (OpenAI's names and defaults)."""

    # Unknown fields (user, logit_bias, ...) are accepted and ignored, as most servers do.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not stop for stop in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionBody(_Body):
    prompt: str | list[int] | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) != 1:
                raise ValueError("one prompt per request (n = 1)")
            return value[0]
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def create_app(engine: BatchEngine, model_name: str, metrics: ServerMetrics | None = None,
               manage_engine: bool = True):
    """The FastAPI application serving ``engine`` under the model id ``model_name``.

    With ``manage_engine``, the app's lifespan starts the engine's thread and, at shutdown,
    cancels what is still in flight (uvicorn has already let open requests finish for its
    graceful-shutdown timeout by then).
    """
    metrics = metrics or ServerMetrics(engine)
    if engine.on_step is None:
        engine.on_step = metrics.on_step
    created = int(time.time())
    # Which process answered: tells replicas apart behind a load balancer (Ray Serve's proxy).
    replica = f"{socket.gethostname()}:{os.getpid()}"

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                # uvicorn let open requests finish first (its graceful-shutdown timeout); what is
                # left now is cancelled, and the engine thread stops.
                await asyncio.to_thread(engine.shutdown, True, 30.0)

    app = FastAPI(title="graphopt", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        return _error(400, f"{'.'.join(location) or 'body'}: {first.get('msg', 'invalid')}",
                      param=".".join(location) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), kind="invalid_request_error" if error.status_code < 500
                      else "server_error", headers=getattr(error, "headers", None))

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "batch_size": engine.batch_size, "queue_depth": engine.queue_depth,
                "replica": replica}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "graphopt"}]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def _request(body: _Body, prompt_ids: list[int], max_tokens: int | None) -> BatchRequest:
        if body.model not in (None, model_name):
            raise LookupError(body.model)
        if max_tokens is None:
            max_tokens = max(engine.context - len(prompt_ids), 1)
        return BatchRequest(tuple(prompt_ids), max_tokens,
                            Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                     seed=body.seed),
                            stop=tuple(body.stop or ()))

    async def _serve(request: Request, body: _Body, batch_request: BatchRequest, chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[SequenceEvent] = asyncio.Queue()
        arrived = time.perf_counter()
        try:
            sequence = engine.submit(batch_request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except PromptTooLongError as error:
            metrics.requests.labels("rejected").inc()
            return _error(400, str(error), param="messages" if chat else "prompt", code="context_length_exceeded")
        except QueueFullError as error:
            metrics.requests.labels("queue_full").inc()
            return _error(503, f"server busy: {error}", kind="server_error", code="queue_full",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
        except EngineClosedError as error:
            metrics.requests.labels("unavailable").inc()
            return _error(503, str(error), kind="server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
        metrics.prompt_tokens.inc(len(batch_request.prompt_ids))
        identifier = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        timing = {"last": None}

        def observe(event: SequenceEvent) -> None:
            if event.token_id is None:
                return
            now = time.perf_counter()
            if timing["last"] is None:
                metrics.time_to_first_token.observe(now - arrived)
            else:
                metrics.inter_token.observe(now - timing["last"])
            timing["last"] = now
            metrics.on_tokens(1)

        def usage() -> dict:
            return {"prompt_tokens": sequence.prompt_length, "completion_tokens": len(sequence.token_ids),
                    "total_tokens": sequence.prompt_length + len(sequence.token_ids)}

        def finished(reason: str | None) -> None:
            metrics.requests.labels("cancelled" if reason == "cancelled" else "error" if reason == "error"
                                    else "completed").inc()

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
                if chat:
                    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                    payload = {"id": identifier, "object": "chat.completion.chunk", "created": int(time.time()),
                               "model": model_name, "choices": [choice]}
                else:
                    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
                    payload = {"id": identifier, "object": "text_completion", "created": int(time.time()),
                               "model": model_name, "choices": [choice]}
                if include_usage:
                    payload["usage"] = None
                return f"data: {json.dumps(payload)}\n\n"

            async def stream():
                reason = None
                try:
                    if chat:
                        yield chunk(None, None, first=True)
                    while True:
                        event = await events.get()
                        observe(event)
                        if event.finish_reason is not None:
                            reason = event.finish_reason
                            break
                        if event.text:
                            yield chunk(event.text, None)
                    yield chunk(None, _openai_reason(reason))
                    if include_usage:
                        payload = {"id": identifier, "object": "chat.completion.chunk" if chat else "text_completion",
                                   "created": int(time.time()), "model": model_name, "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(payload)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    # Runs when the client disconnects too (the response task is cancelled).
                    engine.cancel(sequence)
                    finished(reason or "cancelled")

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        reason = None
        try:
            while reason is None:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        break
                    continue
                observe(event)
                reason = event.finish_reason
        finally:
            engine.cancel(sequence)
            finished(reason or "cancelled")
        if reason is None:
            return Response(status_code=499)  # nobody is listening any more
        if reason == "error":
            return _error(500, "the model failed; see the server log", kind="server_error")
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": sequence.text}, "logprobs": None,
                      "finish_reason": _openai_reason(reason)}
            return {"id": identifier, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [choice], "usage": usage()}
        choice = {"index": 0, "text": sequence.text, "logprobs": None, "finish_reason": _openai_reason(reason)}
        return {"id": identifier, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": [choice], "usage": usage()}

    async def _parse(request: Request, schema):
        """The body as ``schema``, or an OpenAI-format 400 response."""
        try:
            payload = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, _error(400, "the request body is not valid JSON")
        if not isinstance(payload, dict):
            return None, _error(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(payload), None
        except ValidationError as error:
            first = error.errors()[0]
            location = ".".join(str(part) for part in first.get("loc", ()))
            message = first.get("msg", "invalid").removeprefix("Value error, ")
            return None, _error(400, f"{location or 'body'}: {message}", param=location or None)

    def _bad_model(name) -> Any:
        return _error(404, f"the model {name!r} does not exist; this server has {model_name!r}",
                      param="model", code="model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, failure = await _parse(request, CompletionBody)
        if failure is not None:
            return failure
        if isinstance(body.prompt, str):
            prompt_ids = encode_prompt(engine, body.prompt)
        else:
            prompt_ids = list(body.prompt)
            if any(not 0 <= token < engine.tokenizer.vocab_size for token in prompt_ids):
                return _error(400, "prompt: token ids outside the vocabulary", param="prompt")
        if not prompt_ids:
            return _error(400, "prompt: the prompt is empty", param="prompt")
        try:
            batch_request = _request(body, prompt_ids, body.max_tokens if body.max_tokens is not None else 16)
        except LookupError:
            return _bad_model(body.model)
        return await _serve(request, body, batch_request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, failure = await _parse(request, ChatBody)
        if failure is not None:
            return failure
        try:
            messages = [{"role": message.role, "content": message.text()} for message in body.messages]
        except ValueError as error:
            return _error(400, f"messages: {error}", param="messages")
        try:
            text = engine.tokenizer.apply_chat_template(messages)
        except GraphoptError as error:
            return _error(400, str(error), param="messages")
        prompt_ids = engine.tokenizer.encode(text)
        try:
            batch_request = _request(body, prompt_ids, body.max_completion_tokens or body.max_tokens)
        except LookupError:
            return _bad_model(body.model)
        return await _serve(request, body, batch_request, chat=True)

    return app


def _openai_reason(reason: str | None) -> str:
    """OpenAI's finish reasons are ``stop`` and ``length``; a cancelled sequence reads as ``stop``."""
    return "length" if reason == "length" else "stop"


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          ep: str = "cpu", context: int | None = None, threads: int | None = None, model_name: str | None = None,
          shutdown_timeout: float = 30.0, ready=None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
          prefix_cache: int = DEFAULT_PREFIX_CACHE) -> None:
    """Run the server until SIGINT / SIGTERM (uvicorn's handlers): open requests get ``shutdown_timeout``
    seconds to finish, then the rest are cancelled. ``ready(url)`` is called once it listens."""
    import pathlib

    import uvicorn

    # Not spinning: ORT's idle threads would busy-wait on the cores that the event loop and the
    # tokenizer need between steps (on 2 cores under load, 8 streams decoded ~1.3x faster so).
    engine = BatchEngine(model_dir, ep=ep, max_batch=max_batch, max_queue=max_queue, context=context, threads=threads,
                         spinning=False, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache)
    name = model_name or pathlib.Path(model_dir).resolve().name
    app = create_app(engine, name)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout,
                            access_log=False)
    server = uvicorn.Server(config)
    if ready is not None:
        original_startup = server.startup

        async def startup(sockets=None):
            await original_startup(sockets=sockets)
            if server.started:
                ready(f"http://{host}:{port}/v1", name, engine)

        server.startup = startup
    server.run()
