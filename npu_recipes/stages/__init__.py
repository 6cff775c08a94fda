"""Stage modules. Each exposes the same small life cycle:

* ``prepare(config, fresh_output_dir) -> RunDir | None``: once, in the process the user started
  (resolve and fetch inputs, create the run directory if the stage writes one);
* ``run(config, run_dir) -> None``: the work itself, in every worker process.

A stage that can run in several processes sets ``DISTRIBUTED = True``: the runner then plans the
launch from ``parallelism.*`` and starts torchrun workers when more than one process (or DeepSpeed)
is asked for. Every other stage runs once, in the launching process.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from npu_recipes.errors import UserError

STAGE_MODULES = {"train": "npu_recipes.stages.train"}


def load(name: str) -> ModuleType:
    """Import the module for stage ``name``.

    Raises:
        UserError: no such stage.
    """
    if name not in STAGE_MODULES:
        raise UserError(f"unknown stage {name!r}", fix=f"choose stage= one of {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name])
