"""The engines that run jobs: the server's static batcher, or transformers' continuous batching.

``static`` (:class:`~npu_recipes.serving.batcher.Batcher` over
:class:`~npu_recipes.serving.generation.Generator`): one left-padded ``generate`` call per batch;
a request arriving during a batch waits for it to end. Every request field works there.

``continuous`` (:class:`ContinuousEngine`): transformers' ``ContinuousBatchingManager``
(``model.init_continuous_batching``, paged attention cache): requests join and leave the running
batch at token boundaries. It runs the plain requests, greedy ones with no logits processing
(log-probabilities, penalties, ``logit_bias``, ``min_tokens``, grammars, sampling and ``echo``
need per-row processing the manager does not offer); the others go to a static batcher that
runs while the manager is paused (``ContinuousBatchingManager.pause``), so one thread uses the
model at a time. It needs a model without adapters (the manager cannot switch adapters per row)
and an attention implementation the manager keeps usable for ``generate`` (``sdpa`` or flash);
otherwise :func:`create` falls back to ``static`` and says why in the log. Both report through the
jobs' channels; ``/health`` names the engine running.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import List, Optional

from npu_recipes.config.schema import ServeConfig
from npu_recipes.infer.loading import LoadedModel
from npu_recipes.runtime.devices import Device
from npu_recipes.serving.batcher import Batcher, BatchStats
from npu_recipes.serving.jobs import Job

log = logging.getLogger(__name__)

CPU_PAGE_TOKENS = 32
"""Tokens per page of the paged cache on the CPU (transformers' default of 256 wastes memory on short requests)."""

CPU_MAX_BATCH_TOKENS = 512
"""Most tokens per forward pass on the CPU (prefill is chunked to this)."""



def _unsupported_reason(loaded: LoadedModel) -> Optional[str]:
    if loaded.adapters:
        return "adapters are loaded (continuous batching cannot switch adapters per row)"
    attention = getattr(loaded.model.config, "_attn_implementation", None)
    if attention not in ("sdpa", "flash_attention_2", "flash_attention_3"):
        return f"attention implementation {attention!r} (continuous batching needs sdpa or flash attention)"
    if not hasattr(loaded.model, "init_continuous_batching"):
        return "this transformers model has no init_continuous_batching"
    return None


def create(loaded: LoadedModel, settings: ServeConfig, device: Device, metrics):
    """The engine ``serve.engine`` asks for; ``auto`` is ``continuous`` on every device type (on the
    CPU it measured faster from 8 concurrent requests up, bench/results/serve_load-*.json), and
    either falls back to ``static`` where the manager cannot run the model (:func:`_unsupported_reason`).

    The engine has ``submit(jobs)``, ``start()``, ``close()``, ``stats`` (``as_dict()``), ``name``
    and ``eos`` (the end-of-turn token ids).
    """
    from npu_recipes.serving.generation import Generator

    generator = Generator(loaded, device)
    if settings.engine in ("auto", "continuous"):
        reason = _unsupported_reason(loaded)
        if reason is None:
            return ContinuousEngine(loaded, settings, device, generator, metrics)
        # auto falling back is expected (adapters); an explicit continuous that cannot run is worth a warning
        level = logging.INFO if settings.engine == "auto" else logging.WARNING
        log.log(level, "serve.engine=%s: using the static batcher because %s", settings.engine, reason)
    batcher = Batcher(generator, settings.max_batch_size, settings.batch_wait_ms / 1000, metrics)
    batcher.eos = generator.eos
    return batcher


def runs_continuously(job: Job) -> bool:
    """Whether the continuous-batching manager can run ``job`` as asked: greedy, no per-row logits processing."""
    decoding = job.decoding
    return (not decoding.do_sample and decoding.top_logprobs is None and job.prompt_logprobs is None
            and job.grammar is None and not decoding.logit_bias and not decoding.min_tokens
            and decoding.presence_penalty == 0 and decoding.frequency_penalty == 0
            and decoding.repetition_penalty in (None, 1.0) and job.max_tokens > 0)


class _Stream:
    """Turns one request's cumulative outputs from the manager into the job's events (on the event loop)."""

    def __init__(self, engine: "ContinuousEngine", job: Job, request_id: str):
        from npu_recipes.serving.generation import RowText

        self._engine, self._job, self._id = engine, job, request_id
        self._text = RowText(engine.tokenizer, job.stop)
        self._seen = 0

    def __call__(self, output) -> None:
        job = self._job
        if job.done:
            return
        if output.error is not None:
            job.fail(f"generation failed: {output.error}")
            self._engine.count(job)
            return
        if job.cancelled.is_set():
            self._end(None)
            return
        for token in output.generated_tokens[self._seen:]:
            self._seen += 1
            job.completion_tokens += 1
            if token in self._engine.eos_set:
                job.emit(self._text.flush())
                return self._end("stop")
            text, stopped = self._text.add(token)
            if stopped:
                job.emit(text)
                return self._end("stop")
            if job.completion_tokens >= job.max_tokens:
                job.emit(text + self._text.flush())
                return self._end("length")
            job.emit(text)
        if output.is_finished():
            job.emit(self._text.flush())
            self._end("length")

    def _end(self, finish_reason: Optional[str]) -> None:
        job = self._job
        if finish_reason is None:
            job.abandon()
        else:
            job.finish(finish_reason)
        self._engine.manager.cancel_request(self._id)
        self._engine.count(job)


class ContinuousEngine:
    """transformers' continuous batching for plain requests, a paused-manager static batcher for the rest.

    Args:
        loaded: the model (no adapters) and tokenizer.
        settings: ``serve.*``; ``max_batch_size`` bounds the requests in one step of either engine.
        device: where the model runs; on the CPU the paged cache is sized here (:data:`CPU_PAGE_TOKENS`),
            elsewhere transformers sizes it from free device memory.
        generator: the static path's :class:`~npu_recipes.serving.generation.Generator`.
        metrics: a :class:`~npu_recipes.serving.metrics.Metrics`.
    """

    name = "continuous"

    def __init__(self, loaded: LoadedModel, settings: ServeConfig, device: Device, generator, metrics):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.tokenizer = loaded.tokenizer
        self.eos = generator.eos
        self.eos_set = set(self.eos)
        self._metrics = metrics
        self._max_batch = settings.max_batch_size
        self._lock = threading.Lock()
        self._counter = 0
        self._in_flight = 0
        self._stats = BatchStats()
        max_model_len = settings.max_model_len or loaded.model.config.max_position_embeddings
        options = dict(max_requests_per_batch=settings.max_batch_size, allow_block_sharing=False)
        if device.type == "cpu":
            pages = math.ceil(settings.max_batch_size * max_model_len / CPU_PAGE_TOKENS)
            options.update(page_size=CPU_PAGE_TOKENS, num_blocks=pages, max_batch_tokens=CPU_MAX_BATCH_TOKENS,
                           use_cuda_graph=False)
        config = GenerationConfig(do_sample=False, eos_token_id=list(self.eos), pad_token_id=self.tokenizer.pad_token_id,
                                  max_new_tokens=settings.max_tokens_limit)
        self.manager = loaded.model.init_continuous_batching(generation_config=config,
                                                             continuous_batching_config=ContinuousBatchingConfig(**options))
        self._fallback = Batcher(self._paused(generator), settings.max_batch_size, settings.batch_wait_ms / 1000, metrics)

    def _paused(self, generator):
        def run(jobs: List[Job]) -> None:
            with self.manager.pause():
                generator(jobs)
        return run

    @property
    def stats(self) -> BatchStats:
        """Counters of both paths: jobs, tokens; ``generate_calls``/``largest_batch`` of the static path."""
        fallback = self._fallback.stats
        with self._lock:
            return BatchStats(generate_calls=fallback.generate_calls, largest_batch=fallback.largest_batch,
                              completed=self._stats.completed + fallback.completed,
                              cancelled=self._stats.cancelled + fallback.cancelled,
                              failed=self._stats.failed + fallback.failed,
                              completion_tokens=self._stats.completion_tokens + fallback.completion_tokens)

    def count(self, job: Job) -> None:
        """Record a finished continuous job."""
        with self._lock:
            self._in_flight -= 1
            self._occupancy()
            self._stats.record(job)
        self._metrics.generation_tokens.inc(job.completion_tokens)

    def _occupancy(self) -> None:
        # Jobs handed to the manager and not yet ended (queued there or running): the manager's own
        # scheduler state is not public API.
        self._metrics.running.set(self._in_flight)
        self._metrics.batch_occupancy.set(min(1.0, self._in_flight / self._max_batch))

    def start(self) -> None:
        self.manager.start()
        self._fallback.start()

    def submit(self, jobs: List[Job]) -> None:
        """Queue ``jobs``; call on the server's event loop (results are delivered there).

        Raises:
            RuntimeError: the engine is shutting down.
        """
        plain = [job for job in jobs if runs_continuously(job)]
        other = [job for job in jobs if not runs_continuously(job)]
        if other:
            self._fallback.submit(other)
        for job in plain:
            with self._lock:
                request_id = f"job-{self._counter}"
                self._counter += 1
                self._in_flight += 1
                self._occupancy()
            self.manager.register_result_handler(request_id, _Stream(self, job, request_id))
            added = self.manager.add_request(job.prompt_ids, request_id=request_id, max_new_tokens=job.max_tokens,
                                             streaming=True, eos_token_id=list(self.eos))
            if added is None:
                raise RuntimeError("the server is shutting down")

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Finish what is queued on both paths, then stop."""
        self._fallback.close(timeout_s)
        self.manager.stop(block=True, timeout=timeout_s)
