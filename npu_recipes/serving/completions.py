"""The two generation routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``.

Each request becomes one :class:`~npu_recipes.serving.jobs.Job` per choice (``n`` per prompt,
choice ``i`` of a seeded request seeded with ``seed + i``), queued on the engine; the reply is
assembled from the jobs' events, or streamed as server-sent events in OpenAI's chunk format. A
stream always ends with ``data: [DONE]``, after an ``{"error": ...}`` event too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from typing import AsyncIterator, Callable, List, Optional

from fastapi import Request
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse
from jinja2.exceptions import TemplateError

from npu_recipes.serving import grammar, protocol, replies, tools
from npu_recipes.serving.backend import CLIENT_CLOSED_REQUEST, ApiError, Backend, events, sse
from npu_recipes.serving.decoding import Decoding, bias_table
from npu_recipes.serving.jobs import Channel, Delta, Failed, Finished, Job, PromptScored


def _check_fields(backend: Backend, body: protocol.GenerationRequest) -> tuple:
    """The request's ``logit_bias`` table, after refusing unsupported fields.

    Raises:
        ApiError: 400 naming the first unsupported field, or a bad ``logit_bias`` key.
    """
    refused = body.unsupported()
    if refused is not None:
        name, why = refused
        raise ApiError(400, f"{name} is not supported by this server: {why}", param=name, code="unsupported_parameter")
    try:
        return bias_table(body.logit_bias, backend.vocab_size)
    except ValueError as error:
        raise ApiError(400, str(error), param="logit_bias") from None


def _jobs(backend: Backend, body: protocol.GenerationRequest, prompts: List[List[int]], prompt_param: str,
          top_logprobs: Optional[int], logit_bias: tuple, matcher: Optional[Callable[[], object]] = None,
          prompt_logprobs: Optional[int] = None) -> tuple:
    """One job per choice of every prompt (``n`` each), queued; returns (channel, jobs). ``logit_bias``
    is :func:`_check_fields`' table."""
    adapter = backend.adapter_for(body.model)
    budgets = [backend.completion_budget(len(ids), body.requested_max_tokens(), prompt_param) for ids in prompts]
    channel = Channel()
    jobs = []
    for prompt_index, (ids, budget) in enumerate(zip(prompts, budgets)):
        for choice in range(body.n):
            decoding = Decoding.resolve(
                backend.model_defaults, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k_value(),
                min_p=body.min_p, seed=None if body.seed is None else body.seed + choice,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, logit_bias=logit_bias, min_tokens=body.min_tokens,
                top_logprobs=top_logprobs,
            )
            jobs.append(Job(ids, budget, adapter, decoding, body.stop_strings(), channel, prompt_index * body.n + choice,
                            grammar=matcher, prompt_logprobs=prompt_logprobs))
    backend.submit(jobs)
    backend.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts))
    return channel, jobs


def _usage(prompts: List[List[int]], finished: List[Finished]) -> protocol.Usage:
    prompt = sum(len(ids) for ids in prompts)
    completion = sum(event.completion_tokens for event in finished)
    return protocol.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _FirstToken:
    """Observes the time to first token (from the request's arrival) once per request."""

    def __init__(self, backend: Backend):
        self._backend, self._start, self._seen = backend, time.monotonic(), False

    def __call__(self, event) -> None:
        if not self._seen and isinstance(event, Delta) and event.text:
            self._seen = True
            self._backend.metrics.time_to_first_token.observe(time.monotonic() - self._start)


async def _collect(request: Request, channel: Channel, jobs: List[Job], first: _FirstToken) -> Optional[tuple]:
    """Every choice's :class:`~npu_recipes.serving.replies.ChoiceText` and Finished event, or None when the client left."""
    texts = [replies.ChoiceText() for _ in jobs]
    finished: List[Optional[Finished]] = [None] * len(jobs)
    async with aclosing(events(request, channel, jobs)) as stream:
        async for event in stream:
            first(event)
            if isinstance(event, Failed):
                raise ApiError(500, event.message, type="server_error")
            if isinstance(event, Delta):
                texts[event.index].text += event.text
                texts[event.index].logprobs.extend(event.logprobs)
            elif isinstance(event, PromptScored):
                texts[event.index].prompt.extend(event.logprobs)
            else:
                finished[event.index] = event
    return None if None in finished else (texts, finished)


async def _stream(request: Request, channel: Channel, jobs: List[Job], first: _FirstToken, on_event,
                  on_usage: Optional[Callable[[List[Finished]], bytes]], opening: List[bytes]) -> AsyncIterator[bytes]:
    """Server-sent events: ``opening``, then what ``on_event`` makes of each event, a usage event
    (``on_usage``, when set and every choice finished), and ``[DONE]``. A generation failure becomes
    an ``{"error": ...}`` event (the openai client raises it), then ``[DONE]``."""
    for chunk in opening:
        yield chunk
    finished = []
    async with aclosing(events(request, channel, jobs)) as stream:
        async for event in stream:
            first(event)
            if isinstance(event, Failed):
                yield sse(ApiError(500, event.message, type="server_error").body())
                break
            if isinstance(event, Finished):
                finished.append(event)
            for chunk in on_event(event):
                yield chunk
    if on_usage is not None and len(finished) == len(jobs):
        yield on_usage(finished)
    yield sse("[DONE]")


def render(backend: Backend, messages: List[protocol.ChatMessage], tool_list: Optional[List[dict]],
           add_generation_prompt: bool = True) -> str:
    """The chat prompt text (:func:`npu_recipes.serving.tools.render_chat`).

    Raises:
        ApiError: 400 when the chat template rejects the messages.
    """
    turns = [message.as_template_input() for message in messages]
    try:
        if not add_generation_prompt:
            return backend.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)
        return tools.render_chat(backend.tokenizer, turns, tool_list, backend.template_has_tools)
    except TemplateError as error:
        raise ApiError(400, f"The model's chat template rejected the messages: {error}", param="messages") from None


def _chat_prompt(backend: Backend, messages: List[protocol.ChatMessage], tool_list: Optional[List[dict]]) -> List[int]:
    """The chat prompt's token ids (run off the event loop: a long prompt takes seconds to render and tokenize).

    Raises:
        ApiError: 400 when the chat template rejects the messages.
    """
    return backend.tokenizer(render(backend, messages, tool_list), add_special_tokens=False)["input_ids"]


async def _chat_matcher(backend: Backend, body: protocol.ChatCompletionRequest, tool_list: Optional[List[dict]]) -> Optional[Callable]:
    """A factory of grammar matchers for the request (None: unconstrained), compiled once here so a bad schema is a 400.
    ``tool_list``: the request's tools as dicts, None when tools are off."""
    forced = tool_list is not None and (body.tool_choice == "required" or isinstance(body.tool_choice, protocol.NamedToolChoice))
    schema = grammar.json_schema_of(body.response_format)
    if forced and schema is not None:
        raise ApiError(400, "response_format cannot be combined with tool_choice 'required' or a named function",
                       param="response_format")
    if forced:
        choice = body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump()

        def make():
            return backend.grammars.tool_calls(tool_list, choice, body.parallel_tool_calls)
        param = "tools"
    elif schema is not None:
        def make():
            return backend.grammars.json_schema(schema)
        param = "response_format"
    else:
        return None
    try:
        await asyncio.to_thread(make)
    except grammar.GrammarError as error:
        raise ApiError(400, str(error), param=param) from None
    return make


async def chat(backend: Backend, body: protocol.ChatCompletionRequest, request: Request):
    """``POST /v1/chat/completions``."""
    first = _FirstToken(backend)
    tools_on = bool(body.tools) and body.tool_choice != "none"
    names = [tool.function.name for tool in body.tools] if tools_on else None
    tool_list = [tool.model_dump(exclude_none=True) for tool in body.tools] if tools_on else None
    logit_bias = _check_fields(backend, body)
    prompts = [await asyncio.to_thread(_chat_prompt, backend, body.messages, tool_list)]
    matcher = await _chat_matcher(backend, body, tool_list)
    top = (body.top_logprobs or 0) if body.logprobs else None
    channel, jobs = _jobs(backend, body, prompts, "messages", top, logit_bias, matcher)
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    token_text = replies.TokenText(backend.tokenizer)

    def logprobs(choices) -> Optional[protocol.ChatLogprobs]:
        return None if top is None else protocol.ChatLogprobs(content=replies.chat_logprobs(choices, token_text))

    if body.stream:
        filters = {job.index: tools.ToolTextFilter() for job in jobs} if tools_on else {}

        def chunk(choices, usage=None) -> bytes:
            return sse(protocol.ChatCompletionChunk(id=reply_id, created=created, model=body.model, choices=choices,
                                                    usage=usage))

        def on_event(event) -> List[bytes]:
            if isinstance(event, Delta):
                content = filters[event.index].feed(event.text) if tools_on else event.text
                if not content and not event.logprobs:
                    return []
                return [chunk([protocol.ChatChunkChoice(index=event.index, delta=protocol.ChatDelta(content=content),
                                                        logprobs=logprobs(event.logprobs))])]
            if not isinstance(event, Finished):
                return []
            out, reason = [], event.finish_reason
            if tools_on:
                content, calls = replies.tool_message(filters[event.index].held(), names)
                if content:
                    out.append(chunk([protocol.ChatChunkChoice(index=event.index, delta=protocol.ChatDelta(content=content))]))
                if calls and reason != "length":  # a reply cut at max_tokens says so, calls or not (as OpenAI's does)
                    reason = "tool_calls"
                    deltas = [protocol.ToolCallDelta(index=i, id=call.id, type="function",
                                                     function=protocol.FunctionCallDelta(name=call.function.name,
                                                                                         arguments=call.function.arguments))
                              for i, call in enumerate(calls)]
                    out.append(chunk([protocol.ChatChunkChoice(index=event.index, delta=protocol.ChatDelta(tool_calls=deltas))]))
            out.append(chunk([protocol.ChatChunkChoice(index=event.index, delta=protocol.ChatDelta(), finish_reason=reason)]))
            return out

        opening = [chunk([protocol.ChatChunkChoice(index=job.index, delta=protocol.ChatDelta(role="assistant", content=""))])
                   for job in jobs]
        on_usage = (lambda finished: chunk([], _usage(prompts, finished))) if body.include_usage() else None
        return EventSourceResponse(_stream(request, channel, jobs, first, on_event, on_usage, opening))

    result = await _collect(request, channel, jobs, first)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    texts, finished = result
    choices = []
    for job in jobs:
        content, calls = replies.tool_message(texts[job.index].text, names)
        reason = finished[job.index].finish_reason
        reason = "tool_calls" if calls and reason != "length" else reason
        choices.append(protocol.ChatChoice(index=job.index, message=protocol.AssistantMessage(content=content, tool_calls=calls),
                                           finish_reason=reason, logprobs=logprobs(texts[job.index].logprobs)))
    return protocol.ChatCompletion(id=reply_id, created=created, model=body.model, choices=choices,
                                   usage=_usage(prompts, finished))


async def complete(backend: Backend, body: protocol.CompletionRequest, request: Request):
    """``POST /v1/completions``."""
    first = _FirstToken(backend)
    problem = body.prompt_problem(backend.vocab_size)
    if problem is not None:
        raise ApiError(400, problem[1], param=problem[0])
    logit_bias = _check_fields(backend, body)
    given = body.prompts()

    def encode() -> tuple:
        ids = [backend.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in given]
        texts = [(p if isinstance(p, str) else backend.tokenizer.decode(p)) if body.echo else "" for p in given]
        return ids, texts

    # Off the event loop: a long prompt takes seconds to tokenize, and /health must answer meanwhile.
    prompts, echoes = await asyncio.to_thread(encode)
    top = body.logprobs
    scored = top if body.echo and top is not None else None
    channel, jobs = _jobs(backend, body, prompts, "prompt", top, logit_bias, prompt_logprobs=scored)
    reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    token_text = replies.TokenText(backend.tokenizer)

    def reply(choices, usage=None) -> protocol.Completion:
        return protocol.Completion(id=reply_id, created=created, model=body.model, choices=choices, usage=usage)

    def prompt_of(index: int) -> int:
        return index // body.n

    if body.stream:
        offsets = {job.index: 0 for job in jobs}

        def text_chunk(index: int, text: str, choices=(), first_token: Optional[int] = None) -> bytes:
            logprobs = None
            if top is not None:
                logprobs = replies.completion_logprobs(choices, token_text, offsets[index], first_token)
                offsets[index] = (logprobs.text_offset[-1] + len(logprobs.tokens[-1])) if logprobs.tokens else offsets[index]
            return sse(reply([protocol.CompletionChoice(index=index, text=text, logprobs=logprobs)]))

        def on_event(event) -> List[bytes]:
            if isinstance(event, PromptScored):
                ids = prompts[prompt_of(event.index)]
                return [text_chunk(event.index, echoes[prompt_of(event.index)], event.logprobs, ids[0])]
            if isinstance(event, Delta):
                return [text_chunk(event.index, event.text, event.logprobs)]
            if isinstance(event, Finished):
                return [sse(reply([protocol.CompletionChoice(index=event.index, text="", finish_reason=event.finish_reason)]))]
            return []

        opening = [] if scored is not None or not body.echo else [
            sse(reply([protocol.CompletionChoice(index=job.index, text=echoes[prompt_of(job.index)])])) for job in jobs]
        on_usage = (lambda finished: sse(reply([], _usage(prompts, finished)))) if body.include_usage() else None
        return EventSourceResponse(_stream(request, channel, jobs, first, on_event, on_usage, opening))

    result = await _collect(request, channel, jobs, first)
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    texts, finished = result
    choices = []
    for job in jobs:
        produced, ids = texts[job.index], prompts[prompt_of(job.index)]
        logprobs = None
        if top is not None:
            logprobs = replies.completion_logprobs(produced.prompt + produced.logprobs, token_text, 0,
                                                   ids[0] if scored is not None else None)
        choices.append(protocol.CompletionChoice(index=job.index, text=echoes[prompt_of(job.index)] + produced.text,
                                                 finish_reason=finished[job.index].finish_reason, logprobs=logprobs))
    return reply(choices, _usage(prompts, finished))
