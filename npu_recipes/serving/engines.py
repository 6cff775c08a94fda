"""Choosing the engine that runs the jobs: the server's static batcher or transformers' continuous batching.

Both take :class:`~npu_recipes.serving.jobs.Job` objects through ``submit`` and report through the
jobs' channels; ``/health`` names the one running (``engine``).
"""

from __future__ import annotations

import logging

from npu_recipes.config.schema import ServeConfig
from npu_recipes.infer.loading import LoadedModel
from npu_recipes.runtime.devices import Device

log = logging.getLogger(__name__)


def create(loaded: LoadedModel, settings: ServeConfig, device: Device, metrics):
    """The engine ``serve.engine`` asks for (``auto``: the static batcher, measured faster on CPU).

    The engine has ``submit(jobs)``, ``start()``, ``close()``, ``stats`` (``as_dict()``), ``name``
    and ``eos`` (the end-of-turn token ids).
    """
    from npu_recipes.serving.batcher import Batcher
    from npu_recipes.serving.generation import Generator

    generator = Generator(loaded, device)
    batcher = Batcher(generator, settings.max_batch_size, settings.batch_wait_ms / 1000, metrics)
    batcher.eos = generator.eos
    return batcher
