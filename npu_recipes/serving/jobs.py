"""One prompt to complete, its decoding settings, and the events that carry its text back.

A :class:`Job` is one choice of one prompt: created by a request handler on the server's event
loop, completed by the generation thread, and reports through its :class:`Channel` (thread-safe, into an asyncio
queue). Cancelling is a ``threading.Event`` the generation thread checks after every token.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

from npu_recipes.serving.decoding import Decoding, TokenChoice


@dataclass(frozen=True)
class Delta:
    """New text of choice ``index``, and the tokens generated since the last Delta (with their
    log-probabilities; empty unless the request asked for them)."""

    index: int
    text: str
    logprobs: Tuple[TokenChoice, ...] = ()


@dataclass(frozen=True)
class PromptScored:
    """Log-probabilities of choice ``index``'s prompt tokens after the first (``echo`` with ``logprobs``)."""

    index: int
    logprobs: Tuple[TokenChoice, ...]


@dataclass(frozen=True)
class Finished:
    """Choice ``index`` is complete: ``finish_reason`` ``stop`` (end of turn or a stop string) or ``length``."""

    index: int
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """Generation for choice ``index`` raised; ``message`` says what happened."""

    index: int
    message: str


Event = Union[Delta, PromptScored, Finished, Failed]


class Channel:
    """Carries events from the generation thread to one request's event loop. Create it on that loop."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, event: Event) -> None:
        """Deliver ``event`` (from any thread). A closed loop means the request is gone: dropped."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            pass

    async def get(self, timeout_s: float) -> Optional[Event]:
        """The next event, or None after ``timeout_s`` seconds without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None


class Job:
    """One prompt (token ids) to complete with at most ``max_tokens`` new tokens (0: score the prompt only).

    ``adapter`` is the PEFT adapter name, or None for the base model with adapters disabled.
    ``decoding`` holds the choice's own settings (:class:`~npu_recipes.serving.decoding.Decoding`);
    ``grammar`` makes its constrained-decoding matcher (None: unconstrained). ``stop`` holds
    strings that end the completion. ``prompt_logprobs`` None: the prompt is not scored; N: its
    tokens' log-probabilities with N alternatives each are sent first (``echo``). ``index`` is
    the choice index reported in events. ``outcome`` becomes ``stop``/``length`` (finished),
    ``cancelled`` or ``failed``.
    """

    def __init__(
        self,
        prompt_ids: list,
        max_tokens: int,
        adapter: Optional[str],
        decoding: Decoding,
        stop: Tuple[str, ...],
        channel: Channel,
        index: int = 0,
        grammar: Optional[Callable[[], object]] = None,
        prompt_logprobs: Optional[int] = None,
    ):
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.adapter = adapter
        self.decoding = decoding
        self.stop = stop
        self.channel = channel
        self.index = index
        self.grammar = grammar
        self.prompt_logprobs = prompt_logprobs
        self.cancelled = threading.Event()
        self.outcome: Optional[str] = None
        self.completion_tokens = 0

    @property
    def batch_key(self) -> Optional[str]:
        """Jobs with equal keys may share a ``generate`` call: the adapter, since every row decodes by
        its own settings (:mod:`npu_recipes.serving.decoding`), greedy or sampled, seeded or not."""
        return self.adapter

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def emit(self, text: str, logprobs: Tuple[TokenChoice, ...] = ()) -> None:
        """Send new text and the new tokens' log-probabilities (nothing when both are empty)."""
        if text or logprobs:
            self.channel.put(Delta(self.index, text, logprobs))

    def scored(self, logprobs: Tuple[TokenChoice, ...]) -> None:
        """Send the prompt's log-probabilities."""
        self.channel.put(PromptScored(self.index, logprobs))

    def finish(self, finish_reason: str) -> None:
        """Mark complete and send :class:`Finished`."""
        self.outcome = finish_reason
        self.channel.put(Finished(self.index, finish_reason, self.completion_tokens))

    def fail(self, message: str) -> None:
        """Mark failed and send :class:`Failed`."""
        self.outcome = "failed"
        self.channel.put(Failed(self.index, message))

    def cancel(self) -> None:
        """Ask the generation thread to stop this job (the client went away); safe from any thread."""
        self.cancelled.set()

    def abandon(self) -> None:
        """Called by the generation thread when it sees the cancel request; sends nothing."""
        self.outcome = "cancelled"
