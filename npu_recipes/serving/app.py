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
from contextlib import asynccontextmanager
from typing import List, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from npu_recipes.serving import protocol
from npu_recipes.serving.backend import ApiError, Backend
from npu_recipes.serving.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

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
