"""What the routes share: the :class:`Backend` they serve from, OpenAI-style errors (:class:`ApiError`),
server-sent events and the loop that waits for a request's jobs (:func:`events`).

Imported by :mod:`~npu_recipes.serving.app` (the routes) and :mod:`~npu_recipes.serving.completions`
(the two completion routes' logic), so that neither imports the other.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.sse import format_sse_event
from pydantic import BaseModel

from npu_recipes.config.schema import ServeConfig
from npu_recipes.serving import protocol
from npu_recipes.serving.jobs import Channel, Delta, Event, Job, PromptScored
from npu_recipes.serving.metrics import Metrics

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
