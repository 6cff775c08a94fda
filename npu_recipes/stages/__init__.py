"""Stage modules. Each exposes the same small life cycle:

* ``prepare(config, fresh_output_dir) -> RunDir | None``: once, in the process the user started
  (resolve and fetch inputs, create the run directory if the stage writes one);
* ``run(config, run_dir) -> None``: the work itself, in every worker process.

A stage that sets ``IN_LAUNCHER_ONLY = True`` (doctor, merge, infer, serve, plan) runs once in the
launching process whatever ``parallelism`` or ``NPROC_PER_NODE`` say; it is never started as N workers.
Any other stage (train) is planned from ``parallelism.*`` and started as torchrun workers when more
than one process, or DeepSpeed, is asked for (:mod:`npu_recipes.launch`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from npu_recipes.errors import UserError

STAGE_MODULES = {
    "train": "npu_recipes.stages.train",
    "doctor": "npu_recipes.stages.doctor",
    "merge": "npu_recipes.stages.merge",
    "infer": "npu_recipes.stages.infer",
    "serve": "npu_recipes.stages.serve",
    "plan": "npu_recipes.stages.plan",
}


def load(name: str) -> ModuleType:
    """Import the module for stage ``name``.

    Raises:
        UserError: no such stage.
    """
    if name not in STAGE_MODULES:
        raise UserError(f"unknown stage {name!r}", fix=f"choose stage= one of {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[name])
