"""``/metrics``: the server's counters in Prometheus' text format, through prometheus-client.

Names follow vLLM's where one exists (``prompt_tokens_total``, ``generation_tokens_total``,
``time_to_first_token_seconds``, ``num_requests_waiting``), under the ``npu_recipes_`` prefix.
Each server has its own registry, so several servers in one process do not share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
"""Seconds; vLLM's time-to-first-token buckets up to two minutes."""


class Metrics:
    """The server's Prometheus metrics (see the module docstring); methods are safe from any thread.

    Args:
        max_batch_size: most rows in one batch, the bound of the batch-size histogram.
    """

    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry()
        self.requests = Counter("npu_recipes_requests", "Finished requests by route and HTTP status.",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("npu_recipes_prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=self.registry)
        self.generation_tokens = Counter("npu_recipes_generation_tokens", "Generated tokens.", registry=self.registry)
        self.time_to_first_token = Histogram("npu_recipes_time_to_first_token_seconds",
                                             "Seconds from a request's arrival to its first generated text.",
                                             buckets=_TTFT_BUCKETS, registry=self.registry)
        self.waiting = Gauge("npu_recipes_num_requests_waiting", "Choices queued, not yet in a batch.",
                             registry=self.registry)
        self.running = Gauge("npu_recipes_num_requests_running", "Choices in the batch being generated.",
                             registry=self.registry)
        self.batch_occupancy = Gauge("npu_recipes_batch_occupancy",
                                     "Rows in the running batch over the largest batch (0 to 1).", registry=self.registry)
        self.batch_size = Histogram("npu_recipes_batch_size", "Rows per generation batch.",
                                    buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, max_batch_size})), registry=self.registry)
        self._max_batch_size = max_batch_size

    def batch_started(self, rows: int, waiting: int) -> None:
        """A batch of ``rows`` started with ``waiting`` choices left in the queue."""
        self.batch_size.observe(rows)
        self.running.set(rows)
        self.batch_occupancy.set(rows / self._max_batch_size)
        self.waiting.set(waiting)

    def batch_ended(self) -> None:
        self.running.set(0)
        self.batch_occupancy.set(0)

    def exposition(self) -> bytes:
        """The text format body of ``GET /metrics``."""
        return generate_latest(self.registry)
