"""The generation queue: jobs wait here until a worker thread runs them in batches.

One worker thread owns the model, so adapters are switched between batches, never during one.
It takes the oldest waiting job and every other waiting job with the same
:attr:`~npu_recipes.serving.jobs.Job.batch_key` (the adapter), up to ``max_batch_size``; when fewer
are waiting it waits up to ``wait_s`` for more to arrive. Jobs with other keys keep their place in
line. This is static batching: a batch runs to completion before the next starts (transformers
``generate`` has no way to add rows to a running call).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

from npu_recipes.serving.jobs import Job

log = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """Counters since start: ``generate_calls``, ``largest_batch`` (jobs), jobs ``completed``,
    ``cancelled`` (client went away), ``failed``, and ``completion_tokens`` generated for them."""

    generate_calls: int = 0
    largest_batch: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def record(self, job: Job) -> None:
        """Count a job that has ended, by its outcome, and the tokens generated for it."""
        if job.outcome == "cancelled":
            self.cancelled += 1
        elif job.outcome == "failed":
            self.failed += 1
        else:
            self.completed += 1
        self.completion_tokens += job.completion_tokens


class Batcher:
    """Queue jobs from any thread; run them in batches of equal ``batch_key`` on one worker thread.

    Args:
        run_batch: completes a list of jobs (all of one key); sets each job's outcome. An exception
            fails every job of the batch that has no outcome yet, and the worker carries on.
        max_batch_size: most jobs per call of ``run_batch``.
        wait_s: how long (seconds) an idle worker waits for a batch to fill before starting it.
        metrics: a :class:`~npu_recipes.serving.metrics.Metrics` told of queue length, batches and tokens.
    """

    name = "static"
    """The engine's name in ``/health``."""

    def __init__(self, run_batch: Callable[[List[Job]], None], max_batch_size: int, wait_s: float, metrics=None):
        self._run_batch = run_batch
        self._metrics = metrics
        self._max_batch_size = max_batch_size
        self._wait_s = wait_s
        self._pending: List[Job] = []
        self._condition = threading.Condition()
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self.stats = BatchStats()

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._work, name="npu_recipes-generate", daemon=True)
        self._thread.start()

    def submit(self, jobs: List[Job]) -> None:
        """Queue ``jobs`` (one request's choices, queued together so they can share a batch).

        Raises:
            RuntimeError: the batcher is closing.
        """
        with self._condition:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._pending.extend(jobs)
            if self._metrics is not None:
                self._metrics.waiting.set(len(self._pending))
            self._condition.notify()

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Run what is queued, then stop the worker; waits up to ``timeout_s`` seconds for it."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _drop_cancelled(self) -> None:
        for job in [job for job in self._pending if job.cancelled.is_set()]:
            self._pending.remove(job)
            job.abandon()
            self.stats.cancelled += 1

    def _next_batch(self) -> Optional[List[Job]]:
        with self._condition:
            while True:
                self._drop_cancelled()
                if self._pending or self._closing:
                    break
                self._condition.wait()
            if not self._pending:
                return None
            key = self._pending[0].batch_key
            deadline = time.monotonic() + self._wait_s
            while True:
                batch = [job for job in self._pending if job.batch_key == key][: self._max_batch_size]
                remaining = deadline - time.monotonic()
                if len(batch) == self._max_batch_size or remaining <= 0 or self._closing:
                    break
                self._condition.wait(remaining)
                self._drop_cancelled()
            for job in batch:
                self._pending.remove(job)
            if self._metrics is not None:
                self._metrics.batch_started(len(batch), len(self._pending))
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            self.stats.generate_calls += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            try:
                self._run_batch(batch)
            except Exception as error:
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    if not job.done:
                        job.fail(f"generation failed: {type(error).__name__}: {error}")
            for job in batch:
                self.stats.record(job)
            if self._metrics is not None:
                self._metrics.generation_tokens.inc(sum(job.completion_tokens for job in batch))
                self._metrics.batch_ended()
