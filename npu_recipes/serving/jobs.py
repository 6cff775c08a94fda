"""One prompt to complete, its decoding settings, and the events that carry its text back.

A :class:`Job` is created by a request handler on the server's event loop, completed by the
generation thread, and reports through its :class:`Channel` (thread-safe, into an asyncio
queue). Cancelling is a ``threading.Event`` the generation thread checks after every token.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Optional, Tuple, Union


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; jobs share a ``generate`` call only when these and the model are equal.

    ``do_sample`` None keeps the model's ``generation_config`` (as do ``temperature``/``top_p``
    None). ``seed`` seeds torch's generators before the batch starts.
    """

    do_sample: Optional[bool] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None

    @classmethod
    def from_request(cls, temperature: Optional[float], top_p: Optional[float], seed: Optional[int]) -> "Sampling":
        """OpenAI semantics: ``temperature`` 0 is greedy; any other given value (or ``top_p``) samples."""
        if temperature == 0:
            return cls(do_sample=False, seed=seed)
        if temperature is None and top_p is None:
            return cls(seed=seed)
        return cls(do_sample=True, temperature=temperature, top_p=top_p, seed=seed)


@dataclass(frozen=True)
class Delta:
    """New text of choice ``index``."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    """Choice ``index`` is complete: ``finish_reason`` ``stop`` (end of turn or a stop string) or ``length``."""

    index: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """Generation for choice ``index`` raised; ``message`` says what happened."""

    index: int
    message: str


Event = Union[Delta, Finished, Failed]


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
    """One prompt (token ids) to complete with at most ``max_tokens`` new tokens.

    ``adapter`` is the PEFT adapter name, or None for the base model with adapters disabled.
    ``stop`` holds strings that end the completion. ``index`` is the choice index reported in
    events. ``outcome`` becomes ``stop``/``length`` (finished), ``cancelled`` or ``failed``.
    """

    def __init__(
        self,
        prompt_ids: list,
        max_tokens: int,
        adapter: Optional[str],
        sampling: Sampling,
        stop: Tuple[str, ...],
        channel: Channel,
        index: int = 0,
    ):
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.adapter = adapter
        self.sampling = sampling
        self.stop = stop
        self.channel = channel
        self.index = index
        self.cancelled = threading.Event()
        self.outcome: Optional[str] = None
        self.completion_tokens = 0

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a ``generate`` call.

        A seeded job gets a key of its own: a seed then reproduces the same tokens whatever else
        is queued, because the random stream is not shared with other rows.
        """
        if self.sampling.seed is not None:
            return ("seeded", id(self))
        return (self.adapter, self.sampling)

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def emit(self, text: str) -> None:
        """Send new text (nothing when empty)."""
        if text:
            self.channel.put(Delta(self.index, text))

    def finish(self, finish_reason: str) -> None:
        """Mark complete and send :class:`Finished`."""
        self.outcome = finish_reason
        self.channel.put(Finished(self.index, finish_reason, len(self.prompt_ids), self.completion_tokens))

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
