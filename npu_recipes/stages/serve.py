"""Serve stage: an OpenAI-compatible HTTP server on plain PyTorch/transformers (docs/serving.md).

``python -m npu_recipes stage=serve [model=...] [adapters=RUN/checkpoint-N | {name: path, ...}]``
loads the base (or merged) model and its adapters with :func:`npu_recipes.infer.loading.load`, then
serves them with uvicorn until SIGTERM/SIGINT, after which in-flight requests finish first
(uvicorn's graceful shutdown). It writes no run directory.
"""

from __future__ import annotations

import logging
from typing import Optional

from npu_recipes.config import compose
from npu_recipes.config.schema import RecipeConfig
from npu_recipes.infer import adapters, loading
from npu_recipes.run.rundir import RunDir
from npu_recipes.runtime import devices
from npu_recipes.serving import server
from npu_recipes.stages import Prepared

log = logging.getLogger(__name__)


class ServeStage:
    """One server process on one device, whatever ``parallelism`` a recipe sets for training."""

    in_launcher_only = True

    def prepare(self, config: RecipeConfig, fresh_output_dir: bool) -> Prepared:
        """Nothing to prepare: serving creates no run directory."""
        return Prepared(config, None)

    def run(self, config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
        """Load the model and adapters, then serve until a shutdown signal.

        The port is bound first, so a busy one fails in a second rather than after the model loaded.

        Raises:
            UserError: fastapi/uvicorn missing, the port unavailable, adapters on a base other than
                their own (without ``serve.allow_base_mismatch``), an adapter named like the base
                model, or anything :func:`npu_recipes.infer.loading.load` refuses.
        """
        server.check_packages()
        sock = server.bind(config.serve.host, config.serve.port)
        device = devices.resolve(config.device)
        parsed = adapters.parse_adapters(config.adapters)
        explicit = compose.command_line_keys()
        base = adapters.base_model_config(config.model, parsed, explicit)
        log.info("base model: %s (from %s)", base.name_or_path, adapters.base_model_source(parsed, explicit))
        server.check_base_model(base, parsed, config.serve.allow_base_mismatch)
        loaded = loading.load(base, parsed, device)
        server.serve(loaded, config.serve, device, sock)


STAGE = ServeStage()
