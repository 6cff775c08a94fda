"""The FastAPI application: OpenAI's routes over the engine, bearer-key checks, OpenAI-style errors.

Routes: ``GET /health`` and ``GET /metrics`` (never need a key), ``GET /v1/models``,
``GET /v1/models/{id}``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(:mod:`~npu_recipes.serving.completions`), and vLLM's ``POST /tokenize`` and ``POST /detokenize``.
Every error reply, including FastAPI's own validation errors and unknown routes, has OpenAI's
``{"error": {...}}`` body. Client mistakes are 400 (401 for a missing or wrong key, 404 for an
unknown model), so a bad request never costs more than its own reply.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import format_sse_event
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from npu_recipes.config.schema import ServeConfig
from npu_recipes.serving import protocol
from npu_recipes.serving.jobs import Channel, Delta, Event, Job, PromptScored
from npu_recipes.serving.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5
"""While waiting for tokens, how often (seconds) a request checks whether its client has gone."""

CLIENT_CLOSED_REQUEST = 499
"""Status logged for a non-streaming request whose client left before the answer (nginx's code)."""


class ApiError(Exception):
    """An error reply in OpenAI's format: HTTP ``status`` and ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> protocol.ErrorResponse:
        detail = protocol.ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return protocol.ErrorResponse(error=detail)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)


@dataclass
class Backend:
    """What the routes need besides the request.

    ``engine`` queues jobs and completes them (the static batcher or the continuous-batching
    engine: ``submit``, ``start``, ``close``, ``stats``, ``name``). ``base_id`` is the base model's
    id; ``adapter_ids`` are the PEFT adapter names, each its own model id. ``max_model_len`` is the
    context in tokens (prompt plus completion). ``vocab_size`` is the model's logits width;
    ``model_defaults`` its ``GenerationConfig``; ``grammars`` a
    :class:`~npu_recipes.serving.grammar.Grammars`; ``template_has_tools`` whether the chat
    template renders ``tools``. ``info`` (device, dtype, package versions) is reported by ``/health``.
    """

    tokenizer: object
    engine: object
    base_id: str
    adapter_ids: List[str]
    max_model_len: int
    serve: ServeConfig
    vocab_size: int
    model_defaults: object
    grammars: object
    metrics: Metrics
    template_has_tools: bool = False
    info: Dict[str, object] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))

    def adapter_for(self, model_id: str) -> Optional[str]:
        """The adapter a request's ``model`` selects (None: the base model).

        Raises:
            ApiError: 404 ``model_not_found`` for an id that is neither the base nor an adapter.
        """
        if model_id == self.base_id:
            return None
        if model_id in self.adapter_ids:
            return model_id
        served = ", ".join([self.base_id, *self.adapter_ids])
        raise ApiError(404, f"The model `{model_id}` does not exist. Models served here: {served}", param="model",
                       code="model_not_found")

    def cards(self) -> List[protocol.ModelCard]:
        base = protocol.ModelCard(id=self.base_id, created=self.created, max_model_len=self.max_model_len)
        return [base] + [protocol.ModelCard(id=name, created=self.created, parent=self.base_id,
                                            max_model_len=self.max_model_len) for name in self.adapter_ids]

    def submit(self, jobs: List[Job]) -> None:
        """Queue ``jobs`` on the engine.

        Raises:
            ApiError: 503 while the server shuts down.
        """
        try:
            self.engine.submit(jobs)
        except RuntimeError as error:
            raise ApiError(503, str(error), type="server_error") from None

    def completion_budget(self, prompt_tokens: int, requested: Optional[int], prompt_param: str) -> int:
        """``max_tokens`` for a prompt of ``prompt_tokens`` tokens.

        Unset: ``serve.default_max_tokens``, shortened to what the context leaves.

        Raises:
            ApiError: 400 when ``requested`` exceeds ``serve.max_tokens_limit`` or the context,
                or the prompt alone fills the context.
        """
        limit = self.serve.max_tokens_limit
        if requested is not None and requested > limit:
            raise ApiError(400, f"max_tokens={requested} exceeds this server's limit of {limit} (serve.max_tokens_limit)",
                           param="max_tokens")
        room = self.max_model_len - prompt_tokens
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens, and the prompt "
                                f"alone is {prompt_tokens} tokens. Please shorten the prompt.", param=prompt_param,
                           code="context_length_exceeded")
        if requested is None:
            return min(self.serve.default_max_tokens, room)
        if requested == 0:
            return 0
        if requested > room:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                                f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                                f"{requested} for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return requested


def sse(payload: Union[BaseModel, str]) -> bytes:
    """One server-sent event carrying ``payload`` (a model as JSON, or a string such as ``[DONE]``)."""
    return format_sse_event(data_str=payload if isinstance(payload, str) else payload.model_dump_json())


def _validation_message(errors) -> tuple:
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg"))
        return f"The request body is not valid JSON: {reason}", None
    parts, params = [], []
    for error in errors[:5]:
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, protocol.FieldError):
            # A check across fields runs on the whole body; the field at fault is the one it names.
            params.append(cause.param)
            parts.append(str(cause))
            continue
        location = ".".join(str(part) for part in error["loc"][1:])
        params.append(location or None)
        parts.append(f"{location or 'body'}: {error['msg']}")
    return "Invalid request: " + "; ".join(parts), params[0]


async def events(request: Request, channel: Channel, jobs: List[Job]) -> AsyncIterator[Event]:
    """Yield the jobs' events until each has finished or failed; stop early if the client leaves.

    Closing this iterator (the client went away, the response was cancelled) cancels every job,
    which stops its rows at the next generated token.
    """
    open_jobs = len(jobs)
    clock = asyncio.get_running_loop().time
    next_check = clock() + DISCONNECT_POLL_S
    try:
        while open_jobs:
            event = await channel.get(DISCONNECT_POLL_S)
            if clock() >= next_check:
                if await request.is_disconnected():
                    return
                next_check = clock() + DISCONNECT_POLL_S
            if event is None:
                continue
            if not isinstance(event, (Delta, PromptScored)):
                open_jobs -= 1
            yield event
    finally:
        for job in jobs:
            job.cancel()


class _CountRequests:
    """Counts POST requests by route and status (``npu_recipes_requests_total``).

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` would wrap ``receive`` and hide a
    client's disconnect from ``Request.is_disconnected``, which stops abandoned generations.
    """

    def __init__(self, app, metrics: Metrics):
        self._app, self._metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            await self._app(scope, receive, send)
            return
        status = []

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            self._metrics.requests.labels(getattr(route, "path", "unmatched"), str(status[0] if status else 500)).inc()


class _LimitBody:
    """Refuses a request body over ``limit`` bytes with 413 before any route reads it.

    A declared ``Content-Length`` over the limit is refused at once; a chunked body is read up to
    the limit, then handed to the route in one piece (the routes read whole bodies anyway). A plain
    ASGI middleware, like :class:`_CountRequests`, so later ``receive`` calls still see a disconnect.
    """

    def __init__(self, app, limit: int):
        self._app, self._limit = app, limit

    async def _refuse(self, scope, receive, send) -> None:
        error = ApiError(413, f"The request body is larger than this server's limit of {self._limit} bytes "
                              "(serve.max_request_bytes); send a shorter prompt or raise the limit.",
                         code="request_too_large")
        await error.response()(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self._app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limit:
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self._app(scope, _replay([message], receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self._limit:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self._app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive),
                        send)


def _replay(messages: List[dict], receive):
    """An ASGI ``receive`` that gives ``messages`` first, then defers to ``receive``."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()
    return replayed


def create_app(backend: Backend) -> FastAPI:
    """Build the application; its lifespan starts the engine and closes it at shutdown."""
    from npu_recipes.serving import completions

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.engine.start()
        yield
        await asyncio.to_thread(backend.engine.close)

    app = FastAPI(title="npu_recipes serve", lifespan=lifespan)
    bearer = HTTPBearer(auto_error=False)

    async def require_key(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        expected = backend.serve.api_key
        if expected is None:
            return
        if credentials is None:
            raise ApiError(401, "Missing API key: send the header `Authorization: Bearer <key>`.", code="invalid_api_key")
        if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    app.add_middleware(_LimitBody, limit=backend.serve.max_request_bytes)
    app.add_middleware(_CountRequests, metrics=backend.metrics)  # added last: outermost, so it counts the 413s too

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        message, param = _validation_message(error.errors())
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return ApiError(error.status_code, str(error.detail), param=None).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return ApiError(500, f"internal server error: {type(error).__name__}", type="server_error").response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "engine": backend.engine.name, "models": [backend.base_id, *backend.adapter_ids],
                **backend.info, "batches": backend.engine.stats.as_dict()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(backend.metrics.exposition(), media_type=CONTENT_TYPE)

    keyed = [Depends(require_key)]
    api = APIRouter(prefix="/v1", dependencies=keyed)

    @api.get("/models", response_model=protocol.ModelList)
    async def list_models() -> protocol.ModelList:
        return protocol.ModelList(data=backend.cards())

    @api.get("/models/{model_id:path}", response_model=protocol.ModelCard)
    async def retrieve_model(model_id: str) -> protocol.ModelCard:
        backend.adapter_for(model_id)
        return next(card for card in backend.cards() if card.id == model_id)

    @api.post("/chat/completions", response_model=None)
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        return await completions.chat(backend, body, request)

    @api.post("/completions", response_model=None)
    async def text_completions(body: protocol.CompletionRequest, request: Request):
        return await completions.complete(backend, body, request)

    vllm = APIRouter(dependencies=keyed)

    @vllm.post("/tokenize", response_model=protocol.TokenizeResponse)
    async def tokenize(body: protocol.TokenizeRequest) -> protocol.TokenizeResponse:
        if body.model is not None:
            backend.adapter_for(body.model)
        tokenizer = backend.tokenizer

        def encode() -> tuple:
            if body.messages is not None:
                text = completions.render(backend, body.messages, None, add_generation_prompt=body.add_generation_prompt)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
            return ids, tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None

        ids, strs = await asyncio.to_thread(encode)
        return protocol.TokenizeResponse(count=len(ids), max_model_len=backend.max_model_len, tokens=ids, token_strs=strs)

    @vllm.post("/detokenize", response_model=protocol.DetokenizeResponse)
    async def detokenize(body: protocol.DetokenizeRequest) -> protocol.DetokenizeResponse:
        if body.model is not None:
            backend.adapter_for(body.model)
        bad = [token for token in body.tokens if token >= backend.vocab_size]
        if bad:
            raise ApiError(400, f"tokens holds token id {bad[0]}, outside this model's vocabulary "
                                f"(0 to {backend.vocab_size - 1})", param="tokens")
        return protocol.DetokenizeResponse(prompt=backend.tokenizer.decode(body.tokens))

    app.include_router(api)
    app.include_router(vllm)
    return app
