"""Turning generated tokens into OpenAI's reply pieces: token strings and bytes, log-probability
objects of chat and of completions, and the per-choice text/tool-call assembly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from npu_recipes.serving import protocol, tools
from npu_recipes.serving.decoding import TokenChoice


class TokenText:
    """Token id -> its text and UTF-8 bytes, cached (a token may be part of a multi-byte character).

    For byte-level BPE vocabularies (Qwen's) the bytes are the token's exact bytes, so a client can
    join the ``bytes`` of consecutive tokens into a character that no single token completes.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: Dict[int, Tuple[str, List[int]]] = {}
        try:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        except ImportError:
            self._byte_of = {}

    def __call__(self, token: int) -> Tuple[str, List[int]]:
        """(the token's text, its bytes)."""
        if token not in self._cache:
            text = self._tokenizer.decode([token])
            raw = self._tokenizer.convert_ids_to_tokens(token)
            if isinstance(raw, str) and raw and all(char in self._byte_of for char in raw) and "\ufffd" in text:
                data = [self._byte_of[char] for char in raw]
            else:
                data = list(text.encode("utf-8"))
            self._cache[token] = (text, data)
        return self._cache[token]


def chat_logprobs(choices: Sequence[TokenChoice], token_text: TokenText) -> List[protocol.TokenLogprob]:
    """Chat's ``logprobs.content`` entries: each token with its ``top_logprobs`` alternatives."""
    entries = []
    for choice in choices:
        text, data = token_text(choice.token)
        top = [protocol.TopLogprob(token=token_text(token)[0], logprob=logprob, bytes=token_text(token)[1])
               for token, logprob in choice.top]
        entries.append(protocol.TokenLogprob(token=text, logprob=choice.logprob, bytes=data, top_logprobs=top))
    return entries


def completion_logprobs(choices: Sequence[TokenChoice], token_text: TokenText, offset: int,
                        first_prompt_token: Optional[int] = None) -> protocol.CompletionLogprobs:
    """Legacy completions' ``logprobs`` for ``choices``, text offsets counted from ``offset``.

    ``first_prompt_token`` (under ``echo``) comes first with no log-probability. Each
    ``top_logprobs`` dict holds the alternatives and the chosen token, as vLLM reports it.
    """
    result = protocol.CompletionLogprobs()
    if first_prompt_token is not None:
        text = token_text(first_prompt_token)[0]
        result.tokens.append(text)
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
        result.text_offset.append(offset)
        offset += len(text)
    for choice in choices:
        text = token_text(choice.token)[0]
        top = {token_text(token)[0]: logprob for token, logprob in choice.top}
        top.setdefault(text, choice.logprob)
        result.tokens.append(text)
        result.token_logprobs.append(choice.logprob)
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(text)
    return result


@dataclass
class ChoiceText:
    """What one choice has produced so far: text, the tokens' log-probabilities, prompt scores."""

    text: str = ""
    logprobs: List[TokenChoice] = field(default_factory=list)
    prompt: List[TokenChoice] = field(default_factory=list)


def tool_message(text: str, names: Optional[List[str]]) -> Tuple[Optional[str], Optional[List[protocol.ToolCall]]]:
    """(content, tool calls) of a finished chat reply; ``names`` None: tools are off, the text is the content."""
    if names is None:
        return text, None
    content, calls = tools.parse_tool_calls(text, names)
    if not calls:
        return text, None
    return content, [protocol.ToolCall(id=tools.call_id(), function=protocol.FunctionCall(name=name, arguments=arguments))
                     for name, arguments in calls]
