"""The FastAPI application: OpenAI's routes over the batcher, bearer-key checks, OpenAI-style errors.

Routes: ``GET /health`` (never needs a key), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions``, ``POST /v1/completions``. Every error reply, including FastAPI's
own validation errors and unknown routes, has OpenAI's ``{"error": {...}}`` body. Client mistakes
are 400 (401 for a missing or wrong key, 404 for an unknown model), so a bad request never
costs more than its own reply.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from jinja2.exceptions import TemplateError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from npu_recipes.config.schema import ServeConfig
from npu_recipes.serving import protocol
from npu_recipes.serving.batcher import Batcher
from npu_recipes.serving.jobs import Channel, Delta, Event, Failed, Finished, Job, Sampling

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

    ``base_id`` is the base model's id; ``adapter_ids`` are the PEFT adapter names, each its own
    model id. ``max_model_len`` is the context in tokens (prompt plus completion). ``info``
    (device, dtype, package versions) is reported by ``/health``.
    """

    tokenizer: object
    batcher: Batcher
    base_id: str
    adapter_ids: List[str]
    max_model_len: int
    serve: ServeConfig
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
        base = protocol.ModelCard(id=self.base_id, created=self.created)
        return [base] + [protocol.ModelCard(id=name, created=self.created, parent=self.base_id) for name in self.adapter_ids]

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
        if requested > room:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                                f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                                f"{requested} for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return requested


def _sse(payload: Union[BaseModel, str]) -> bytes:
    return format_sse_event(data_str=payload if isinstance(payload, str) else payload.model_dump_json())


def _validation_message(errors) -> tuple:
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first.get("msg"))
        return f"The request body is not valid JSON: {reason}", None
    parts = []
    for error in errors[:5]:
        location = ".".join(str(part) for part in error["loc"][1:]) or "body"
        parts.append(f"{location}: {error['msg']}")
    param = ".".join(str(part) for part in first["loc"][1:]) or None
    return "Invalid request: " + "; ".join(parts), param


async def _events(request: Request, channel: Channel, jobs: List[Job]) -> AsyncIterator[Event]:
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
            if not isinstance(event, Delta):
                open_jobs -= 1
            yield event
    finally:
        for job in jobs:
            job.cancel()


def create_app(backend: Backend) -> FastAPI:
    """Build the application; its lifespan starts the batcher's worker and closes it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        backend.batcher.start()
        yield
        await asyncio.to_thread(backend.batcher.close)

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
        return {"status": "ok", "models": [backend.base_id, *backend.adapter_ids], **backend.info,
                "batches": backend.batcher.stats.as_dict()}

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @api.get("/models", response_model=protocol.ModelList)
    async def list_models() -> protocol.ModelList:
        return protocol.ModelList(data=backend.cards())

    @api.get("/models/{model_id:path}", response_model=protocol.ModelCard)
    async def retrieve_model(model_id: str) -> protocol.ModelCard:
        backend.adapter_for(model_id)
        return next(card for card in backend.cards() if card.id == model_id)

    def submit(body: protocol.GenerationRequest, prompts: List[List[int]], prompt_param: str) -> tuple:
        adapter = backend.adapter_for(body.model)
        budgets = [backend.completion_budget(len(ids), body.requested_max_tokens(), prompt_param) for ids in prompts]
        sampling = Sampling.from_request(body.temperature, body.top_p, body.seed)
        channel = Channel()
        jobs = [Job(ids, budget, adapter, sampling, body.stop_strings(), channel, index)
                for index, (ids, budget) in enumerate(zip(prompts, budgets))]
        try:
            backend.batcher.submit(jobs)
        except RuntimeError as error:
            raise ApiError(503, str(error), type="server_error") from None
        return channel, jobs

    async def collect(request: Request, channel: Channel, jobs: List[Job]) -> Optional[tuple]:
        """Texts and Finished events of every job, or None when the client left first."""
        texts, finished = [""] * len(jobs), [None] * len(jobs)
        async with aclosing(_events(request, channel, jobs)) as events:
            async for event in events:
                if isinstance(event, Failed):
                    raise ApiError(500, event.message, type="server_error")
                if isinstance(event, Delta):
                    texts[event.index] += event.text
                else:
                    finished[event.index] = event
        return None if None in finished else (texts, finished)

    def usage(finished: List[Finished]) -> protocol.Usage:
        prompt = sum(event.prompt_tokens for event in finished)
        completion = sum(event.completion_tokens for event in finished)
        return protocol.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def sse_stream(request: Request, channel: Channel, jobs: List[Job], include_usage: bool, on_delta, on_finish,
                         on_usage, first: Optional[bytes] = None) -> AsyncIterator[bytes]:
        """Server-sent events: ``first``, one event per Delta/Finished, a usage event, ``[DONE]``.

        A generation failure becomes an ``{"error": ...}`` event (the openai client raises it) and ends the stream.
        """
        if first is not None:
            yield first
        finished = []
        async with aclosing(_events(request, channel, jobs)) as events:
            async for event in events:
                if isinstance(event, Failed):
                    yield _sse(ApiError(500, event.message, type="server_error").body())
                    return
                if isinstance(event, Delta):
                    yield on_delta(event)
                else:
                    finished.append(event)
                    yield on_finish(event)
        if include_usage and len(finished) == len(jobs):
            yield on_usage(usage(finished))
        yield _sse("[DONE]")

    @api.post("/chat/completions", response_model=None)
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        tokenizer = backend.tokenizer
        try:
            text = tokenizer.apply_chat_template([m.as_template_input() for m in body.messages], tokenize=False,
                                                 add_generation_prompt=True)
        except TemplateError as error:
            raise ApiError(400, f"The model's chat template rejected the messages: {error}", param="messages") from None
        channel, jobs = submit(body, [tokenizer(text, add_special_tokens=False)["input_ids"]], "messages")
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices, usage_=None) -> bytes:
            return _sse(protocol.ChatCompletionChunk(id=reply_id, created=created, model=body.model, choices=choices,
                                                     usage=usage_))

        if body.stream:
            first = protocol.ChatChunkChoice(index=0, delta=protocol.ChatDelta(role="assistant", content=""))
            return EventSourceResponse(sse_stream(
                request, channel, jobs, body.include_usage(),
                first=chunk([first]),
                on_delta=lambda event: chunk([protocol.ChatChunkChoice(index=event.index, delta=protocol.ChatDelta(content=event.text))]),
                on_finish=lambda event: chunk([protocol.ChatChunkChoice(index=event.index, delta=protocol.ChatDelta(),
                                                                        finish_reason=event.finish_reason)]),
                on_usage=lambda usage_: chunk([], usage_),
            ))
        result = await collect(request, channel, jobs)
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        texts, finished = result
        choices = [protocol.ChatChoice(index=i, message=protocol.AssistantMessage(content=texts[i]),
                                       finish_reason=finished[i].finish_reason) for i in range(len(jobs))]
        return protocol.ChatCompletion(id=reply_id, created=created, model=body.model, choices=choices, usage=usage(finished))

    @api.post("/completions", response_model=None)
    async def completions(body: protocol.CompletionRequest, request: Request):
        prompts = [backend.tokenizer(prompt)["input_ids"] for prompt in body.prompts()]
        channel, jobs = submit(body, prompts, "prompt")
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def reply(choices, usage_=None) -> protocol.Completion:
            return protocol.Completion(id=reply_id, created=created, model=body.model, choices=choices, usage=usage_)

        if body.stream:
            return EventSourceResponse(sse_stream(
                request, channel, jobs, body.include_usage(),
                on_delta=lambda event: _sse(reply([protocol.CompletionChoice(index=event.index, text=event.text)])),
                on_finish=lambda event: _sse(reply([protocol.CompletionChoice(index=event.index, text="",
                                                                               finish_reason=event.finish_reason)])),
                on_usage=lambda usage_: _sse(reply([], usage_)),
            ))
        result = await collect(request, channel, jobs)
        if result is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        texts, finished = result
        choices = [protocol.CompletionChoice(index=i, text=texts[i], finish_reason=finished[i].finish_reason)
                   for i in range(len(jobs))]
        return reply(choices, usage(finished))

    app.include_router(api)
    return app
