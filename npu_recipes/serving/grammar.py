"""Grammar-constrained decoding with xgrammar: ``response_format`` and forced tool calls always parse.

xgrammar was picked over llguidance and outlines-core by measured per-token cost
(bench/grammar_overhead.py, docs/choices.md). One :class:`Grammars` per served tokenizer compiles
(and caches) a grammar per request shape; each row gets its own :class:`Matcher`, which masks the
row's logits to the tokens the grammar allows next and advances with the chosen token. xgrammar is
imported on the first constrained request, not at start-up (its import takes seconds).
"""

from __future__ import annotations

import json
import threading
from typing import List, Optional

import torch


class GrammarError(ValueError):
    """The schema (or tool parameters) cannot be compiled; the message says why."""


class Matcher:
    """One row's grammar state (wraps ``xgrammar.GrammarMatcher``)."""

    def __init__(self, compiled, vocab_size: int, banned: torch.Tensor):
        import xgrammar as xgr

        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._banned = banned

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """(1, vocab) float scores with every token the grammar forbids next, and every banned token, set to -inf."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        scores = scores.clone()
        self._xgr.apply_token_bitmask_inplace(scores, self._bitmask.to(scores.device))
        return scores.masked_fill(self._banned.to(scores.device)[: scores.shape[-1]], float("-inf"))

    def accept(self, token: int) -> None:
        """Advance with the chosen token (one the mask allowed)."""
        self._matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar has accepted a complete output and its end token."""
        return self._matcher.is_terminated()


class Grammars:
    """Compiles grammars for one tokenizer; thread-safe; compiled grammars are cached by xgrammar.

    Args:
        tokenizer: the served Hugging Face tokenizer.
        vocab_size: the model's logits width (``config.vocab_size``; may exceed the tokenizer's length).
        stop_token_ids: the end-of-turn tokens that end a constrained output.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: List[int]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop = stop_token_ids
        self._compiler = None
        self._control_tokens: Optional[dict] = None
        self._lock = threading.Lock()

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop)
                self._compiler = xgr.GrammarCompiler(info)
                self._control_tokens = {allow_newline: self._tokens_with_control_bytes(info.decoded_vocab, allow_newline)
                                        for allow_newline in (False, True)}
            return self._compiler

    def _tokens_with_control_bytes(self, decoded_vocab, allow_newline: bool) -> torch.Tensor:
        # xgrammar's JSON strings admit raw control characters (U+0000 to U+001F), which strict JSON
        # parsers (json.loads, pydantic) reject; a token holding one is never chosen under a grammar.
        # Tool calls need the newline of Qwen's <tool_call> markup (their arguments are re-serialised).
        control = set(range(0x20)) - ({0x0A} if allow_newline else set())
        banned = torch.zeros(self.vocab_size, dtype=torch.bool)
        stops = set(self._stop)
        for token, text in enumerate(decoded_vocab[: self.vocab_size]):
            if token not in stops and control.intersection(text):
                banned[token] = True
        return banned

    def json_schema(self, schema: dict) -> Matcher:
        """JSON valid against ``schema``, without free whitespace (a small model would otherwise pad forever).

        Raises:
            GrammarError: xgrammar cannot compile the schema.
        """
        try:
            compiled = self._get_compiler().compile_json_schema(json.dumps(schema), any_whitespace=False)
        except (RuntimeError, ValueError, TypeError) as error:
            raise GrammarError(f"cannot build a grammar for this JSON schema: {error}") from None
        return Matcher(compiled, self.vocab_size, self._control_tokens[False])

    def tool_calls(self, tools: List[dict], tool_choice, parallel: bool) -> Matcher:
        """Qwen's ``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks whose arguments
        validate against each function's ``parameters`` (xgrammar's ``qwen_3`` structural tag, the
        format Qwen2 and Qwen2.5 use too).

        Args:
            tools: OpenAI tool objects (``{"type": "function", "function": {...}}``).
            tool_choice: ``"required"`` (at least one call of any tool) or a named-function choice dict (that call).
            parallel: whether more than one call may follow.
        Raises:
            GrammarError: a function's parameters cannot be compiled.
        """
        import xgrammar as xgr

        try:
            tag = xgr.get_model_structural_tag("qwen_3", tools=tools, tool_choice=tool_choice, reasoning="disabled",
                                               parallel_tool_calls=parallel, max_whitespace_cnt=1)
            compiled = self._get_compiler().compile_structural_tag(tag)
        except (RuntimeError, ValueError, TypeError) as error:
            raise GrammarError(f"cannot build a grammar for these tools: {error}") from None
        return Matcher(compiled, self.vocab_size, self._control_tokens[True])


def json_schema_of(response_format) -> Optional[dict]:
    """The schema a ``response_format`` asks for: ``{"type": "object"}`` for json_object, the given
    schema for json_schema (an absent schema allows any JSON value), None for text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    return response_format.json_schema.schema_ or {}
