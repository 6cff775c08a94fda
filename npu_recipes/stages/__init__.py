"""Stage modules. Each exposes the same small life cycle:

* ``prepare(config, fresh_output_dir) -> RunDir | None``: once, in the process the user started
  (resolve and fetch inputs, create the run directory if the stage writes one);
* ``run(config, run_dir) -> None``: the work itself, in every worker process.

A stage that sets ``IN_LAUNCHING_PROCESS_ONLY = True`` (plan) runs once in the process the user
started, whatever the parallelism: the runner starts no workers for it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from npu_recipes.errors import UserError

STAGE_MODULES = {"train": "npu_recipes.stages.train", "plan": "npu_recipes.stages.plan"}


def load(name: str) -> ModuleType:
    """Import the module for stage ``name``.

    Raises:
        UserError: no such stage.
    """
    if name not in STAGE_MODULES:
        raise UserError(f"unknown stage {name!r}", fix=f"choose stage= one of {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name])


def needs_workers(stage: ModuleType, world_size: int) -> bool:
    """True when ``stage`` runs in ``world_size`` > 1 worker processes rather than in the launching one."""
    return world_size > 1 and not getattr(stage, "IN_LAUNCHING_PROCESS_ONLY", False)
