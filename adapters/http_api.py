"""The HTTP face: an OpenAI-compatible API (FastAPI) over the engine, with conversation memory.

Routes (`create_app`): ``/v1/chat/completions`` and ``/v1/completions`` (streaming as server-sent
events, as OpenAI's), ``/v1/models``, ``/health``, ``/metrics`` (Prometheus) and the memory
routes under ``/v1/conversations`` and ``/v1/authors``. Any OpenAI client works unchanged; the
project's own choices travel as extra body fields (``persona``, ``preset``, ``decoding``,
``conversation_id``; the Python client's ``extra_body``).

Memory: a chat request without a conversation id is stateless, as clients expect: its messages
are the whole context, replayed into a throwaway conversation that is forgotten when the reply is
sent. With one (``conversation_id`` in the body or the ``X-Conversation-Id`` header) the server
keeps the conversation in the engine's store, the one the terminal chat, the Discord bot and the
LangChain history read, and the client sends only its new message.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the
`openai` client shows the message; a stream that fails after it began sends an error event, then
``[DONE]``. A request turned away (bad field, no key, over its rate, server full) stores nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.http_metrics import CONTENT_TYPE, Metrics
from adapters.http_settings import HttpSettings
from chatbot.config import Settings
from chatbot.conversation import check_conversation_id
from chatbot.decoding import get_preset, make_overrides
from chatbot.engine import ChatEngine, Reply, check_stops
from chatbot.errors import ChatbotError, EngineBusy, GenerationFailed, InvalidConversationId
from chatbot.memory import InMemoryStore, check_author_key

__all__ = ["create_app", "Service", "ApiError"]

log = logging.getLogger(__name__)

DEFAULT_AUTHOR = "User"
"""The name a message without OpenAI's ``name`` field is said under."""
STATELESS_SCOPE = "api:stateless:"
"""Conversation ids of the throwaway conversations stateless requests are answered in."""
FINISH_REASONS = {"stop": "stop", "fallback": "stop", "length": "length", "time": "length",
                  "unsafe": "content_filter", "refused": "content_filter"}
"""The engine's finish reasons as OpenAI's (the engine's own is in each reply's ``chatbot`` field)."""


# ---------------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(err: ChatbotError, param: str | None = None) -> ApiError:
    """What the engine's refusal means to a client: its mistake (400), busy (429), or ours (500)."""
    if isinstance(err, EngineBusy):
        return ApiError(429, str(err), type="rate_limit_error", code="busy", headers={"Retry-After": "2"})
    if isinstance(err, GenerationFailed):
        return ApiError(500, str(err), type="server_error", code="generation_failed")
    if isinstance(err, InvalidConversationId):
        return ApiError(400, str(err), param=param or "conversation_id", code="invalid_conversation_id")
    return ApiError(400, str(err), param=param, code="invalid_value")


def _param(loc: tuple[Any, ...]) -> str:
    """A validation error's location as a field path: ``("body", "messages", 0, "role")`` -> ``messages[0].role``."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "list[TextPart]"):
            continue  # a union member's name, not a field
        else:
            out += f".{p}" if out else str(p)
    return out


def validation_error(err: RequestValidationError) -> ApiError:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"`{param}` is not a field this server takes (a typo, or an OpenAI feature it "
                             "does not have)", param=param, code="unknown_field")
    if first.get("type") == "missing":
        return ApiError(400, f"`{param}` is required", param=param, code="missing_field")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(400, f"`{param}`: {message}" if param else message, param=param or None, code="invalid_value")


# ---------------------------------------------------------------------------------------------- requests

class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, min_length=1, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Generation(BaseModel):
    """The fields both generation routes take: OpenAI's, then the project's own."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1, le=2048)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=128)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    user: str | None = Field(None, min_length=1, max_length=200)
    preset: str | None = None
    """A decoding preset by name (``balanced``, ``greedy``, ...)."""
    decoding: dict[str, Any] | None = None
    """Any of the engine's decoding settings (`DecodingSettings`), the repetition controls among them."""


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2048)
    top_logprobs: int | None = None
    persona: str | None = None
    """A persona by file name (``friendly``, ``formal``, ...)."""
    conversation_id: str | None = None
    """Keep this conversation in the server's memory (see the module's docstring)."""


class CompletionRequest(_Generation):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# ---------------------------------------------------------------------------------------------- the service

class RateLimiter:
    """At most ``per_minute`` requests per client in any 60 seconds (a sliding log of times).

    Written here: one deque per client is all it takes, where the `limits` package would add a
    dependency and a storage backend for the same count."""

    def __init__(self, per_minute: int, clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self.clients = clients
        self._seen: dict[str, deque[float]] = {}

    def wait(self, client: str, now: float | None = None) -> float:
        """0 when ``client`` may go now (and counts it), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        times = self._seen.get(client)
        if times is None:
            if len(self._seen) >= self.clients:  # bounded: forget the clients quiet for a minute
                self._seen = {k: v for k, v in self._seen.items() if v and v[-1] > now - 60}
            times = self._seen.setdefault(client, deque())
        while times and times[0] <= now - 60:
            times.popleft()
        if len(times) >= self.per_minute:
            return max(0.001, times[0] + 60 - now)
        times.append(now)
        return 0.0


@dataclass
class Service:
    """What the routes share: the engine (None while it loads), its stateless twin, the limits."""

    settings: Settings
    http: HttpSettings
    engine: ChatEngine | None = None
    scratch: ChatEngine | None = None
    """The engine's twin over a throwaway in-memory store: where stateless requests are answered."""
    load_error: str | None = None
    draining: bool = False
    pending: int = 0
    metrics: Metrics = field(default_factory=Metrics)
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.http.requests_per_minute)
        self._keys = self.http.keys()

    def attach(self, engine: ChatEngine) -> None:
        self.engine = engine
        self.scratch = ChatEngine(engine.generator, InMemoryStore(), engine.settings, output_filter=engine.output_filter)

    def ready(self) -> ChatEngine:
        if self.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="draining",
                           headers={"Retry-After": "5"})
        if self.engine is None:
            if self.load_error is not None:
                raise ApiError(503, f"the model failed to load: {self.load_error}", type="server_error",
                               code="load_failed")
            raise ApiError(503, "the model is still loading", type="server_error", code="loading",
                           headers={"Retry-After": "5"})
        return self.engine

    def authorize(self, request: Request) -> str:
        """The client's identity for its rate: its key (checked), or without keys its address."""
        if not self._keys:
            return f"address {request.client.host if request.client else '?'}"
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in self._keys):
            raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>` with one of the "
                                "server's keys", code="invalid_api_key")
        return f"key {given}"

    def admit(self, client: str) -> None:
        wait = self.limiter.wait(client)
        if wait:
            self.metrics.rejected.labels("rate").inc()
            raise ApiError(429, f"too many requests: at most {self.http.requests_per_minute} a minute; "
                                f"try again in {math.ceil(wait)} s", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(math.ceil(wait))})

    def room(self, wanted: int = 1) -> None:
        if self.pending + wanted > self.http.max_pending:
            self.metrics.rejected.labels("full").inc()
            raise ApiError(429, f"the server is answering {self.pending} requests, its limit; try again in a moment",
                           type="rate_limit_error", code="server_busy", headers={"Retry-After": "2"})

    def model_name(self, asked: str | None) -> str:
        if asked is not None and asked != self.http.model_name:
            raise ApiError(404, f"the model `{asked}` does not exist here; this server has `{self.http.model_name}`",
                           param="model", code="model_not_found")
        return self.http.model_name


def _overrides(body: _Generation, max_tokens: int | None) -> dict[str, Any]:
    """The body's decoding fields as the engine's overrides; OpenAI's that have no match here are refused."""
    for name, hint in (("frequency_penalty", "bot_repetition_penalty"), ("presence_penalty", "bot_no_repeat_ngram_size")):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise ApiError(400, f"`{name}` is not supported: this server's repetition controls are its own; set them "
                                f"in the `decoding` field (for example `{hint}`)", param=name, code="unsupported")
    if body.logit_bias:
        raise ApiError(400, "`logit_bias` is not supported by this server", param="logit_bias", code="unsupported")
    if body.logprobs:
        raise ApiError(400, "`logprobs` is not supported by this server", param="logprobs", code="unsupported")
    values = dict(body.decoding or {})
    for ours, theirs in (("max_new_tokens", max_tokens), ("temperature", body.temperature), ("top_p", body.top_p),
                         ("seed", body.seed)):
        if theirs is not None:
            values[ours] = theirs
    try:
        make_overrides(values)
    except ChatbotError as err:
        raise ApiError(400, str(err), param="decoding", code="invalid_value") from None
    if body.preset is not None:
        try:
            get_preset(body.preset)
        except ChatbotError as err:
            raise ApiError(400, str(err), param="preset", code="invalid_value") from None
    try:
        check_stops(body.stop)
    except ChatbotError as err:
        raise ApiError(400, str(err), param="stop", code="invalid_value") from None
    return values


def _seeded(values: dict[str, Any], n: int, index: int) -> dict[str, Any]:
    """The overrides of choice ``index`` of ``n``: each its own seed when the request gave one."""
    if n == 1 or values.get("seed") is None:
        return values
    return {**values, "seed": values["seed"] + index}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _about(reply: Reply) -> dict[str, Any]:
    """The project's own account of a reply, beside OpenAI's fields."""
    return {"conversation_id": None if reply.conversation_id.startswith(STATELESS_SCOPE) else reply.conversation_id,
            "persona": reply.persona, "finish_reason": reply.finish_reason, "timings": reply.timings,
            "safety": list(reply.safety), "attempts": reply.attempts, "refused": reply.refused,
            "window_turns": reply.window_turns, "dropped_turns": len(reply.dropped_turn_ids)}


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------- the app

def create_app(settings: Settings, *, engine: ChatEngine | None = None,
               load: Callable[[Settings], ChatEngine] | None = None) -> FastAPI:
    """The API for ``settings`` (its ``[http]`` table among them). With ``engine`` it answers at once;
    otherwise the model loads in the background when the app starts (``load``, default
    `ChatEngine.from_settings`) and `/health` says 503 until it has. The app closes the engine it
    loaded when it stops; one it was given stays its owner's."""
    http = settings.section(HttpSettings)
    service = Service(settings, http)
    if engine is not None:
        service.attach(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading: asyncio.Task[Any] | None = None
        if service.engine is None:
            async def load_engine() -> None:
                try:
                    loaded = await asyncio.to_thread(load or ChatEngine.from_settings, settings)
                except Exception as err:  # a bad model folder: reported by /health and every request
                    service.load_error = str(err) if isinstance(err, ChatbotError) else f"{type(err).__name__}: {err}"
                    log.error("the model failed to load: %s", service.load_error)
                    on_fail = getattr(app.state, "on_load_failure", None)
                    if on_fail is not None:
                        on_fail(service.load_error)
                    return
                service.attach(loaded)
                log.info("model loaded; answering")

            loading = asyncio.create_task(load_engine())
        try:
            yield
        finally:
            service.draining = True
            if loading is not None:
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
                if service.engine is not None:
                    await service.engine.close()
            if service.scratch is not None:
                await service.scratch.store.close()

    app = FastAPI(title="gpt2-chatbot", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    if http.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(http.cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Conversation-Id"])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if err.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return ApiError(err.status_code, message, type=kind, code=str(err.status_code)).response()

    @app.exception_handler(ChatbotError)
    async def _engine_error(request: Request, err: ChatbotError) -> JSONResponse:
        return from_engine_error(err).response()

    app.add_middleware(_Guard, service=service)

    # ------------------------------------------------------------------ plain routes

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if service.engine is None:
            status = "failed" if service.load_error else "loading"
            return JSONResponse({"status": status, "error": service.load_error}, status_code=503)
        return JSONResponse({"status": "ok", "model": http.model_name, "pending": service.pending})

    @app.get("/metrics")
    async def metrics(_: Client) -> Response:
        service.metrics.requests_running.set(service.pending)
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(_: Client) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card(http.model_name)]})

    @app.get("/v1/models/{model}")
    async def model(model: str, _: Client) -> JSONResponse:
        return JSONResponse(_model_card(service.model_name(model)))

    # ------------------------------------------------------------------ memory routes

    @app.get("/v1/conversations/{conversation_id}")
    async def history(conversation_id: str, _: Client, limit: int = 50) -> JSONResponse:
        engine = service.ready()
        if not 1 <= limit <= 10_000:
            raise ApiError(400, "`limit` must be between 1 and 10000", param="limit")
        turns = await engine.history(conversation_id, limit)
        persona, preset = await engine.choices(conversation_id)
        return JSONResponse({"object": "conversation", "id": conversation_id, "count": await engine.count(conversation_id),
                             "persona": persona.name, "preset": preset,
                             "turns": [{"id": t.id, "role": t.role, "author": t.author, "text": t.text,
                                        "created_at": t.created_at} for t in turns]})

    @app.delete("/v1/conversations/{conversation_id}")
    async def reset(conversation_id: str, _: Client) -> JSONResponse:
        engine = service.ready()
        removed = await engine.reset(conversation_id)
        return JSONResponse({"object": "conversation.deleted", "id": conversation_id, "deleted_turns": removed})

    @app.get("/v1/conversations/{conversation_id}/export")
    async def export(conversation_id: str, _: Client) -> JSONResponse:
        engine = service.ready()
        return JSONResponse(await engine.export(conversation_id))

    @app.delete("/v1/authors/{author_key}")
    async def forget(author_key: str, _: Client) -> JSONResponse:
        engine = service.ready()
        removed = await engine.forget_author(author_key)
        return JSONResponse({"object": "author.deleted", "id": author_key, "deleted_turns": removed})

    @app.get("/v1/authors/{author_key}/export")
    async def export_author(author_key: str, _: Client) -> JSONResponse:
        engine = service.ready()
        return JSONResponse(await engine.export_author(author_key))

    # ------------------------------------------------------------------ generation routes

    @app.post("/v1/chat/completions")
    async def chat(client: Client, body: ChatRequest, request: Request) -> Response:
        started = time.perf_counter()
        engine = service.ready()
        model_name = service.model_name(body.model)
        exchange = _ChatExchange.build(body, request, engine, service)
        service.room(body.n)
        if body.stream:
            return StreamingResponse(_stream_chat(exchange, model_name, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        service.pending += body.n
        try:
            replies = await _deadline(asyncio.gather(*(exchange.reply(i) for i in range(body.n))), http.request_timeout)
        finally:
            service.pending -= body.n
        for reply in replies:
            _count_reply(reply, started)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        return JSONResponse({
            "id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                         "finish_reason": FINISH_REASONS.get(r.finish_reason, "stop"), "logprobs": None}
                        for i, r in enumerate(replies)],
            "usage": _usage(replies[0].prompt_tokens, sum(r.reply_tokens for r in replies)),
            "conversation_id": exchange.conversation_id,
            "chatbot": [_about(r) for r in replies] if body.n > 1 else _about(replies[0]),
        })

    async def _stream_chat(exchange: _ChatExchange, model_name: str, started: float) -> AsyncIterator[bytes]:
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        head = {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model_name}
        first: float | None = None
        service.pending += 1
        try:
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None, "logprobs": None}]})
            async with exchange.stream() as pieces:
                async for piece in _until(pieces, started + http.request_timeout):
                    if first is None:
                        first = time.perf_counter() - started
                    yield _sse({**head, "choices": [{"index": 0, "delta": {"content": piece},
                                                     "finish_reason": None, "logprobs": None}]})
                reply = pieces.reply
            assert reply is not None
            _count_reply(reply, started, first)
            yield _sse({**head, "choices": [{"index": 0, "delta": {},
                                             "finish_reason": FINISH_REASONS.get(reply.finish_reason, "stop"),
                                             "logprobs": None}],
                        "conversation_id": exchange.conversation_id, "chatbot": _about(reply)})
            if exchange.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(reply.prompt_tokens, reply.reply_tokens)})
        except Exception as err:  # the stream has begun: the client learns of it in the stream
            yield _sse(stream_error(err, service).body())
        finally:
            service.pending -= 1
        yield DONE

    def _count_reply(reply: Reply, started: float, first: float | None = None) -> None:
        service.metrics.reply(finish=FINISH_REASONS.get(reply.finish_reason, "stop"), prompt_tokens=reply.prompt_tokens,
                              reply_tokens=reply.reply_tokens, seconds=time.perf_counter() - started,
                              generate_seconds=reply.timings.get("generate"), queued=reply.timings.get("queued"),
                              first_token=first, safety=reply.safety)

    @app.post("/v1/completions")
    async def completions(client: Client, body: CompletionRequest) -> Response:
        started = time.perf_counter()
        engine = service.ready()
        model_name = service.model_name(body.model)
        prompt = _one_prompt(body)
        values = _overrides(body, body.max_tokens)
        if body.n > 1 and body.stream:
            raise ApiError(400, "`n` above 1 cannot be streamed here; ask without `stream`", param="n")
        if body.n > http.max_n:
            raise ApiError(400, f"`n` is at most {http.max_n} here", param="n")
        service.room(body.n)
        prompt_tokens = engine.generator.count_tokens(prompt)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            return StreamingResponse(_stream_completion(engine, body, prompt, values, head, prompt_tokens, started),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        service.pending += body.n
        try:
            outcomes = await _deadline(asyncio.gather(*(
                engine.complete(prompt, preset=body.preset, decoding=_seeded(values, body.n, i), stop=body.stop or ())
                for i in range(body.n))), http.request_timeout)
        finally:
            service.pending -= body.n
        counted = [engine.generator.count_tokens(o.text) if o.text else 0 for o in outcomes]
        for o, tokens in zip(outcomes, counted):
            service.metrics.reply(finish=FINISH_REASONS.get(o.finish, "stop"), prompt_tokens=prompt_tokens,
                                  reply_tokens=tokens, seconds=time.perf_counter() - started, safety=o.reasons)
        return JSONResponse({**head, "choices": [
            {"index": i, "text": o.text, "finish_reason": FINISH_REASONS.get(o.finish, "stop"), "logprobs": None}
            for i, o in enumerate(outcomes)], "usage": _usage(prompt_tokens, sum(counted))})

    async def _stream_completion(engine: ChatEngine, body: CompletionRequest, prompt: str, values: dict[str, Any],
                                 head: dict[str, Any], prompt_tokens: int, started: float) -> AsyncIterator[bytes]:
        service.pending += 1
        text, first = "", None
        try:
            pieces = engine.complete_stream(prompt, preset=body.preset, decoding=values, stop=body.stop or ())
            try:
                async for piece in _until(pieces, started + http.request_timeout):
                    if first is None:
                        first = time.perf_counter() - started
                    text += piece
                    yield _sse({**head, "choices": [{"index": 0, "text": piece, "finish_reason": None,
                                                     "logprobs": None}]})
            finally:
                await pieces.aclose()
            tokens = engine.generator.count_tokens(text) if text else 0
            finish = "stop" if text else "content_filter"  # nothing shown: every try was unsafe
            service.metrics.reply(finish=finish, prompt_tokens=prompt_tokens, reply_tokens=tokens,
                                  seconds=time.perf_counter() - started, first_token=first)
            yield _sse({**head, "choices": [{"index": 0, "text": "", "finish_reason": finish, "logprobs": None}]})
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, tokens)})
        except Exception as err:  # the stream has begun: the client learns of it in the stream
            yield _sse(stream_error(err, service).body())
        finally:
            service.pending -= 1
        yield DONE

    def _one_prompt(body: CompletionRequest) -> str:
        if body.echo or body.suffix is not None or (body.best_of not in (None, 1)):
            which = "echo" if body.echo else "suffix" if body.suffix is not None else "best_of"
            raise ApiError(400, f"`{which}` is not supported by this server", param=which, code="unsupported")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "give one prompt (a string, or a list of one)", param="prompt")
        if not prompts[0]:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return prompts[0]

    return app


def _client(request: Request) -> str:
    """The caller's identity (`Service.authorize`), counted against its rate (`Service.admit`), as a
    dependency: the key and the rate are checked before the body is."""
    service = request.app.state.service
    client = service.authorize(request)
    service.admit(client)
    return client


Client = Annotated[str, Depends(_client)]


def stream_error(err: Exception, service: Service) -> ApiError:
    """What a stream that failed after it began tells its client, in its last event before ``[DONE]``."""
    if isinstance(err, TimeoutError):
        service.metrics.rejected.labels("deadline").inc()
        return _deadline_error()
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ChatbotError):
        return from_engine_error(err)
    log.error("a streamed reply failed", exc_info=err)
    return ApiError(500, f"the reply failed ({type(err).__name__})", type="server_error")


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "gpt2-chatbot"}


def _deadline_error() -> ApiError:
    return ApiError(504, "the reply took longer than the server's `request_timeout`", type="server_error",
                    code="timeout")


async def _until(pieces: Any, deadline: float) -> AsyncIterator[Any]:
    """``pieces`` until ``deadline`` (a `time.perf_counter` time), then `TimeoutError`. Each wait is
    bounded on its own: a timeout around the loop would also fire while this generator waits at a
    ``yield`` for the client, where it would cancel the client's send instead."""
    iterator = pieces.__aiter__()
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise TimeoutError
        try:
            yield await asyncio.wait_for(iterator.__anext__(), remaining)
        except StopAsyncIteration:
            return


async def _deadline(work: Any, seconds: float) -> Any:
    try:
        return await asyncio.wait_for(work, seconds)
    except TimeoutError:
        raise _deadline_error() from None


class _Guard:
    """ASGI middleware (plain, so streams pass through untouched): a body over `max_body_bytes` is
    refused before it is read, and every answer is counted by route, method and status."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.service.http.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        length = headers.get("content-length")
        refused = None
        if length is not None and (not length.isdigit() or int(length) > limit):
            refused = ApiError(413, f"the request body is larger than {limit:,} bytes", code="body_too_large")
        elif length is None and headers.get("transfer-encoding", "").lower() == "chunked":
            refused = ApiError(411, "send the request body with a Content-Length", code="length_required")
        status = [500]

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if refused is not None:
                await refused.response()(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            route = scope.get("route")
            self.service.metrics.http_requests.labels(getattr(route, "path", "unmatched"), scope.get("method", ""),
                                                      str(status[0])).inc()


# ---------------------------------------------------------------------------------------------- one chat request

@dataclass
class _ChatExchange:
    """One chat request, checked, as calls on the engine: stateless (its messages replayed into a
    throwaway conversation) or kept (its new messages added to a stored conversation)."""

    service: Service
    body: ChatRequest
    engine: ChatEngine
    conversation_id: str | None
    earlier: list[tuple[str, str, str]]
    """(role, author, text) of the messages before the one answered."""
    author: str
    text: str
    author_key: str | None
    values: dict[str, Any]
    include_usage: bool

    @classmethod
    def build(cls, body: ChatRequest, request: Request, engine: ChatEngine, service: Service) -> _ChatExchange:
        http = service.http
        header = request.headers.get("x-conversation-id")
        if header is not None and body.conversation_id is not None and header != body.conversation_id:
            raise ApiError(400, "the `conversation_id` field and the X-Conversation-Id header differ",
                           param="conversation_id")
        conversation_id = body.conversation_id or header
        if conversation_id is not None:
            if conversation_id.startswith(STATELESS_SCOPE):
                raise ApiError(400, f"conversation ids starting {STATELESS_SCOPE!r} are the server's own",
                               param="conversation_id")
            try:
                check_conversation_id(conversation_id)
            except ChatbotError as err:
                raise ApiError(400, str(err), param="conversation_id", code="invalid_conversation_id") from None
        if len(body.messages) > http.max_messages:
            raise ApiError(400, f"at most {http.max_messages} messages in one request", param="messages")
        for n, message in enumerate(body.messages):
            if message.role in ("system", "developer"):
                raise ApiError(400, f"messages[{n}]: `{message.role}` messages are not taken here: the bot's "
                                    "character is a persona; choose one with the `persona` field",
                               param=f"messages[{n}].role", code="unsupported")
            if len(message.text()) > engine.settings.max_input_chars:
                raise ApiError(400, f"messages[{n}] is longer than {engine.settings.max_input_chars:,} characters",
                               param=f"messages[{n}].content")
        last = body.messages[-1]
        if last.role != "user":
            raise ApiError(400, "the last message must be the user's: it is the one answered",
                           param=f"messages[{len(body.messages) - 1}].role")
        if conversation_id is not None:
            if any(m.role != "user" for m in body.messages):
                raise ApiError(400, "with a conversation id the server keeps the conversation: send only the new "
                                    "user message(s), not the assistant's replies", param="messages")
            if body.n != 1:
                raise ApiError(400, "`n` must be 1 with a conversation id: one reply is kept", param="n")
        if body.n > http.max_n:
            raise ApiError(400, f"`n` is at most {http.max_n} here", param="n")
        if body.n > 1 and body.stream:
            raise ApiError(400, "`n` above 1 cannot be streamed here; ask without `stream`", param="n")
        if body.persona is not None:
            try:
                engine.persona(body.persona)
            except ChatbotError as err:
                raise ApiError(400, str(err), param="persona", code="invalid_value") from None
        earlier = []
        for n, message in enumerate(body.messages):
            author = message.name or DEFAULT_AUTHOR
            if message.role == "user":
                try:
                    engine.check_author(author)
                except ChatbotError as err:
                    raise ApiError(400, str(err), param=f"messages[{n}].name", code="invalid_value") from None
            if not message.text().strip():
                raise ApiError(400, f"messages[{n}] has no text", param=f"messages[{n}].content")
            earlier.append(("bot" if message.role == "assistant" else "user", author, message.text()))
        role, author, text = earlier.pop()
        author_key = f"api:user:{body.user}" if body.user is not None else None
        if author_key is not None:
            try:
                check_author_key(author_key)
            except ChatbotError as err:
                raise ApiError(400, str(err), param="user", code="invalid_value") from None
        values = _overrides(body, body.max_completion_tokens or body.max_tokens)
        usage = body.stream_options is not None and body.stream_options.include_usage
        return cls(service, body, engine, conversation_id, earlier, author, text, author_key, values, usage)

    def _options(self, index: int) -> dict[str, Any]:
        return {"persona": self.body.persona, "preset": self.body.preset, "author_key": self.author_key,
                "decoding": _seeded(self.values, self.body.n, index) or None, "stop": self.body.stop or ()}

    async def reply(self, index: int = 0) -> Reply:
        try:
            if self.conversation_id is not None:
                await self._add_earlier(self.engine, self.conversation_id)
                return await self.engine.respond(self.conversation_id, self.author, self.text, **self._options(index))
            scratch = self.service.scratch
            assert scratch is not None
            conversation = f"{STATELESS_SCOPE}{uuid.uuid4().hex}"
            try:
                await self._replay(scratch, conversation)
                return await scratch.respond(conversation, self.author, self.text, **self._options(index))
            finally:
                await _forget(scratch, conversation)
        except ApiError:
            raise
        except ChatbotError as err:
            raise from_engine_error(err) from None

    def stream(self) -> _StreamedReply:
        return _StreamedReply(self)

    async def _add_earlier(self, engine: ChatEngine, conversation: str) -> None:
        for _, author, text in self.earlier:
            await engine.remember(conversation, author, text, author_key=self.author_key)

    async def _replay(self, scratch: ChatEngine, conversation: str) -> None:
        if self.body.persona is not None:
            await scratch.set_persona(conversation, self.body.persona)  # the replayed replies are its speaker's
        for role, author, text in self.earlier:
            await scratch.remember(conversation, author, text, role=role, author_key=self.author_key)


class _StreamedReply:
    """``async with exchange.stream() as pieces: async for piece in pieces``; then ``pieces.reply``."""

    def __init__(self, exchange: _ChatExchange) -> None:
        self.exchange = exchange
        self.reply: Reply | None = None
        self._stream: Any = None
        self._scratch: str | None = None

    async def __aenter__(self) -> _StreamedReply:
        ex = self.exchange
        try:
            if ex.conversation_id is not None:
                await ex._add_earlier(ex.engine, ex.conversation_id)
                self._stream = ex.engine.stream(ex.conversation_id, ex.author, ex.text, **ex._options(0))
            else:
                assert ex.service.scratch is not None
                self._scratch = f"{STATELESS_SCOPE}{uuid.uuid4().hex}"
                await ex._replay(ex.service.scratch, self._scratch)
                self._stream = ex.service.scratch.stream(self._scratch, ex.author, ex.text, **ex._options(0))
        except BaseException:
            await self._forget()
            raise
        return self

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        async for piece in self._stream:
            yield piece
        self.reply = self._stream.reply

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._stream is not None:
                await self._stream.aclose()
        finally:
            await self._forget()

    async def _forget(self) -> None:
        if self._scratch is not None and self.exchange.service.scratch is not None:
            await _forget(self.exchange.service.scratch, self._scratch)
            self._scratch = None


async def _forget(scratch: ChatEngine, conversation: str) -> None:
    """A stateless request's throwaway conversation gone, turns and choices."""
    await scratch.reset(conversation)
    await scratch.set_persona(conversation, None)
