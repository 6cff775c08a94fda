"""Pydantic models of the OpenAI API the server speaks (chat completions, completions, models) and
vLLM's ``/tokenize`` and ``/detokenize``.

Field names and shapes follow OpenAI's API reference, so the official ``openai`` client parses
every reply; vLLM's sampling extensions (``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``) are accepted under vLLM's names. A field the server knows but cannot honour is a
400 naming it (:data:`UNSUPPORTED`, checked by :meth:`GenerationRequest.unsupported`), never a
silently different answer; a field unknown to this module is ignored, as OpenAI-compatible servers
commonly do, so newer clients keep working. docs/serving.md has the table of every field.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

FinishReason = Literal["stop", "length", "tool_calls"]

MAX_TOP_LOGPROBS = 20
"""Most ``top_logprobs`` (chat) / ``logprobs`` (completions) per token, OpenAI's chat limit (vLLM's default too)."""

UNSUPPORTED: Dict[str, str] = {
    "audio": "this server generates text only",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "this server has no web search",
    "functions": "the deprecated `functions` field is not accepted; send `tools` instead",
    "function_call": "the deprecated `function_call` field is not accepted; send `tool_choice` instead",
    "suffix": "insertion (a `suffix` after the completion) is not implemented",
    "use_beam_search": "beam search is not implemented",
    "length_penalty": "beam search is not implemented",
    "prompt_logprobs": "send `echo` with `logprobs` (completions) for the prompt's log-probabilities",
    "guided_json": "send `response_format` with `json_schema` instead",
    "guided_regex": "regular-expression constrained decoding is not implemented",
    "guided_choice": "choice-constrained decoding is not implemented",
    "guided_grammar": "grammar-constrained decoding other than JSON is not implemented",
    "structured_outputs": "send `response_format` instead",
    "ignore_eos": "the end-of-turn token always ends a completion here",
    "stop_token_ids": "send `stop` strings instead",
    "include_stop_str_in_output": "stop strings are never included in the output here",
    "skip_special_tokens": "special tokens are always left out of the text here",
    "chat_template": "the model's own chat template is always used",
    "chat_template_kwargs": "the model's own chat template is always used as it is",
    "continue_final_message": "a final assistant message is not continued",
    "documents": "retrieval documents are not passed to the chat template",
    "store": "completions are not stored",
    "service_tier": "there is one processing tier (send \"auto\" or \"default\")",
    "reasoning_effort": "the served models do not reason in a separate phase",
    "verbosity": "answer length follows the prompt and max_tokens only",
}
"""Fields the server knows and refuses when given with a value other than null/false/empty (or one of
:data:`_ALSO_NEUTRAL`'s values for that field), and why."""

_NEUTRAL = (None, False, "", [], {})
_ALSO_NEUTRAL = {"service_tier": ("auto", "default")}

SEED_RANGE = (-2**63, 2**64 - 1)
"""The seeds ``torch.Generator.manual_seed`` takes (a signed or unsigned 64-bit integer); choice i
of a request is seeded with ``seed + i``, so every one of them must lie in this range."""


class FieldError(ValueError):
    """A request check that failed because of one field: ``param`` is its dotted path in the body
    (``messages.0.content``, ``tools.1.function.name``), reported as the error's ``param``."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _lone_surrogate(value, path: str) -> Optional[tuple]:
    """``(path, text)`` of the first string (key or value) in a parsed JSON body that UTF-8 cannot
    encode (a lone UTF-16 surrogate such as ``"\\ud800"``, which JSON allows), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path, value
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        found = _lone_surrogate(key, where) if isinstance(key, str) else None
        found = found or _lone_surrogate(item, where)
        if found:
            return found
    return None


class RequestModel(BaseModel):
    """Base of the request bodies and their parts.

    An explicit ``null`` for a field that has a default means "not given" (OpenAI's API reference
    marks most optional fields nullable, and the openai client sends ``null`` for an argument
    passed as None), so ``{"stream": null}`` is ``stream: false``.
    """

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if not isinstance(data, dict):
            return data
        defaulted = {name for name, info in cls.model_fields.items() if not info.is_required() and info.default is not None}
        defaulted |= {info.alias for name, info in cls.model_fields.items() if info.alias and name in defaulted}
        return {key: value for key, value in data.items() if not (value is None and key in defaulted)}


class RequestBody(RequestModel):
    """A whole request body: every string in it must encode as UTF-8 (tokenizers and the chat
    template take no lone surrogates); a 400 names the first one that does not."""

    @model_validator(mode="before")
    @classmethod
    def _utf8_only(cls, data):
        found = _lone_surrogate(data, "")
        if found:
            path, text = found
            bad = next(index for index, char in enumerate(text) if 0xD800 <= ord(char) <= 0xDFFF)
            raise FieldError(path or "body", f"{path or 'body'} holds a lone UTF-16 surrogate (\\u{ord(text[bad]):04x} at "
                                             f"character {bad}), which is not valid Unicode text; send UTF-8 text")
        return data


class TextPart(RequestModel):
    """A ``{"type": "text", "text": ...}`` content part (the only part type a text model takes)."""

    type: Literal["text"]
    text: str


class FunctionCall(RequestModel):
    """A called function: its name and its arguments as a JSON text (OpenAI's wire format)."""

    name: str
    arguments: str


class ToolCall(RequestModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    """One conversation turn.

    ``content`` is a string or a list of text parts (joined without separator); an assistant turn
    may have ``content`` null when it carries ``tool_calls``; a ``tool`` turn answers the call
    ``tool_call_id``. ``developer`` is OpenAI's newer name for ``system`` and is rendered as one.
    """

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _content_present(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only for an assistant message with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        """The content as one string ("" for null)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def as_template_input(self) -> dict:
        """The message as a transformers chat template expects it (Qwen2's template reads
        ``tool_calls[].function`` with ``arguments`` as a mapping, and ``role: tool`` turns)."""
        message: Dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", "id": call.id,
                                      "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                                     for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _arguments(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


class StreamOptions(RequestModel):
    """``stream_options``: ``include_usage`` adds a last chunk carrying token counts."""

    include_usage: bool = False


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(RequestModel):
    name: str = "response"
    description: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(RequestModel):
    """``response_format``: ``text`` (no constraint), ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


def _bias_in_range(value: float) -> float:
    if not (math.isfinite(value) and -100 <= value <= 100):
        raise ValueError(f"must be a number in [-100, 100], not {value}")
    return value


TokenBias = Annotated[float, AfterValidator(_bias_in_range)]


class GenerationRequest(RequestBody):
    """Fields shared by chat completions and completions.

    ``temperature`` 0 means greedy decoding; unset ``temperature``/``top_p``/``top_k`` take the
    model's ``generation_config`` values. ``seed`` makes sampling reproducible, each choice drawing
    from its own generator. ``stop`` holds any number of strings that end the completion (not
    included). Penalties follow OpenAI's definitions (``presence_penalty``/``frequency_penalty``
    over the completion's tokens) and vLLM's (``repetition_penalty`` over prompt and completion,
    as transformers applies it).
    """

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=0)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=-1)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float = Field(default=0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(default=None, gt=0, le=2)
    logit_bias: Optional[Dict[str, TokenBias]] = None
    min_tokens: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _seeds_in_range(self) -> "GenerationRequest":
        low, high = SEED_RANGE
        if self.seed is not None and not low <= self.seed <= high - (self.n - 1):
            raise FieldError("seed", f"seed={self.seed} is outside the seeds this server takes with n={self.n}: "
                                     f"{low} to {high - (self.n - 1)} (seed + n - 1 seeds the last choice, and "
                                     f"torch.Generator takes 64-bit seeds)")
        return self

    def unsupported(self) -> Optional[tuple]:
        """``(field, why)`` of the first field in :data:`UNSUPPORTED` given with a non-neutral value, else None."""
        extra = self.model_extra or {}
        for name, why in UNSUPPORTED.items():
            if name in extra and extra[name] not in _NEUTRAL + _ALSO_NEUTRAL.get(name, ()):
                return name, why
        return None

    def stop_strings(self) -> tuple:
        """``stop`` as a tuple of non-empty strings."""
        values = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(value for value in values if value)

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def top_k_value(self) -> Optional[int]:
        """``top_k`` with vLLM's "-1 and 0 mean no limit" folded into None."""
        return None if self.top_k is None or self.top_k <= 0 else self.top_k


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions`` body. ``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[List[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    modalities: Optional[List[Literal["text"]]] = None

    @model_validator(mode="after")
    def _chat_rules(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")
        if self.max_tokens == 0:
            raise FieldError("max_tokens", "max_tokens must be at least 1")
        names: Dict[str, int] = {}
        for index, tool in enumerate(self.tools or []):
            name = tool.function.name
            if name in names:
                raise FieldError(f"tools.{index}.function.name", f"tools.{index}.function.name {name!r} is also the "
                                                                 f"name of tools.{names[name]}; function names must be unique")
            names[name] = index
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise FieldError("tool_choice.function.name", f"tool_choice names the function "
                                                          f"{self.tool_choice.function.name!r}, which is not in tools")
        if self.tool_choice == "required" and not self.tools:
            raise FieldError("tool_choice", "tool_choice 'required' needs tools")
        return self

    def requested_max_tokens(self) -> Optional[int]:
        """The completion budget the client asked for, or None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions`` body.

    ``prompt`` is a non-empty string, a list of them (one choice each), a list of token ids, or a
    list of token-id lists (:meth:`prompt_problem` says what is wrong with one that is not).
    ``echo`` puts the prompt in front of the text (and, with ``logprobs``, the prompt tokens'
    log-probabilities in front of the completion's; the first prompt token has none).
    ``max_tokens`` 0 is allowed with ``echo`` only (score the prompt, generate nothing).
    ``best_of`` is accepted when it equals ``n``.
    """

    prompt: Union[str, List[str], List[int], List[List[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = None

    @model_validator(mode="after")
    def _completion_rules(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "max_tokens 0 is allowed only with echo (scoring the prompt)")
        if self.best_of is not None and self.best_of != self.n:
            raise FieldError("best_of", f"best_of={self.best_of} differs from n={self.n}; best_of > n is not implemented")
        return self

    def prompts(self) -> List[Union[str, List[int]]]:
        """``prompt`` as a list of prompts, each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)

    def prompt_problem(self, vocab_size: int) -> Optional[tuple]:
        """``(param, message)`` for an empty prompt, an empty list or string in it, or a token id
        outside ``[0, vocab_size)``; None when every prompt can be completed."""
        if isinstance(self.prompt, list) and not self.prompt:
            return "prompt", "prompt is an empty list; send at least one prompt"
        for index, prompt in enumerate(self.prompts()):
            param = "prompt" if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else f"prompt.{index}"
            if len(prompt) == 0:
                return param, f"{param} is empty; send at least one character or token id"
            if not isinstance(prompt, str):
                bad = [token for token in prompt if not 0 <= token < vocab_size]
                if bad:
                    return param, f"{param} holds token id {bad[0]}, outside this model's vocabulary (0 to {vocab_size - 1})"
        return None

    def requested_max_tokens(self) -> Optional[int]:
        """The completion budget the client asked for, or None."""
        return self.max_tokens


class TokenizeRequest(RequestBody):
    """vLLM's ``POST /tokenize``: a ``prompt``, or ``messages`` rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "send exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: List[int]
    token_strs: Optional[List[str]] = None


class DetokenizeRequest(RequestBody):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    tokens: List[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(BaseModel):
    prompt: str


class Usage(BaseModel):
    """Token counts: ``completion_tokens`` counts every generated token, the end-of-turn token included."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None
    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[List[TokenLogprob]] = None
    refusal: Optional[List[TokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[List[ToolCall]] = None
    refusal: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCallDelta(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[FunctionCallDelta] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[List[ToolCallDelta]] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Optional[FinishReason] = None
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(BaseModel):
    """Legacy completions log-probabilities: per token its text, log-probability (None for the
    first prompt token under ``echo``), its ``top_logprobs`` alternatives, and its character offset."""

    tokens: List[str] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)
    text_offset: List[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[FinishReason] = None
    logprobs: Optional[CompletionLogprobs] = None


class Completion(BaseModel):
    """A completions answer; streamed chunks use the same shape (``usage`` None but in the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    """One servable model id; an adapter's ``parent`` is the base model's id."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "npu_recipes"
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
