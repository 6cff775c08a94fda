"""Pydantic models of the OpenAI API subset the server speaks (chat completions, completions, models).

Field names and shapes follow OpenAI's API reference, so the official ``openai`` client parses
every reply. Request fields the server cannot honour are declared with the only value it
accepts (``n: 1``, penalties ``0``, no ``tools``/``logprobs``/``echo``), so asking for more is a
400 that names the field rather than a silently different answer; fields unknown to this module
are ignored, as OpenAI-compatible servers commonly do, so newer clients keep working.
"""

from __future__ import annotations

from typing import Annotated, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length"]


class TextPart(BaseModel):
    """A ``{"type": "text", "text": ...}`` content part (the only part type a text model takes)."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One conversation turn; ``content`` is a string or a list of text parts (joined without separator)."""

    role: Literal["system", "user", "assistant"]
    content: Union[str, List[TextPart]]
    name: Optional[str] = None

    def as_template_input(self) -> dict:
        """The ``{"role", "content"}`` dict a tokenizer's chat template expects."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": self.role, "content": text}


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk carrying token counts."""

    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Fields shared by chat completions and completions.

    ``temperature`` 0 means greedy decoding; unset ``temperature``/``top_p`` take the model's
    ``generation_config`` values. ``seed`` makes sampling reproducible (a seeded request is never
    batched with others). ``stop`` holds up to 4 strings that end the completion (not included).
    """

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    stop: Union[str, Annotated[List[str], Field(max_length=4)], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0

    def stop_strings(self) -> tuple:
        """``stop`` as a tuple of non-empty strings."""
        values = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(value for value in values if value)

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions`` body. ``max_completion_tokens`` (OpenAI's newer name) wins over ``max_tokens``."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[Literal[False]] = None
    tools: None = None

    def requested_max_tokens(self) -> Optional[int]:
        """The completion budget the client asked for, or None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions`` body: ``prompt`` is one string or a list of strings (one choice each)."""

    prompt: Union[str, List[str]]
    logprobs: Optional[Literal[0]] = None
    echo: Literal[False] = False
    best_of: Optional[Literal[1]] = None
    suffix: None = None

    def prompts(self) -> List[str]:
        """``prompt`` as a list."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def requested_max_tokens(self) -> Optional[int]:
        """The completion budget the client asked for, or None."""
        return self.max_tokens


class Usage(BaseModel):
    """Token counts: ``completion_tokens`` counts every generated token, the end-of-turn token included."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Optional[FinishReason] = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[FinishReason] = None
    logprobs: None = None


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
