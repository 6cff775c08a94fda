"""Stages: one module per command a user runs (train, merge, infer, serve, plan, doctor).

Each module defines one class that satisfies :class:`Stage`, a small life cycle:

* ``prepare(config, fresh_output_dir) -> Prepared``: once, in the process the user started
  (resolve and fetch inputs, check what can be checked before anything loads, create the run
  directory if the stage writes one); returns the config the stage runs with (paths resolved) and
  the run directory;
* ``run(config, run_dir)``: the work itself, in every worker process.

``in_launcher_only`` is declared by every stage: True (doctor, merge, infer, serve, plan) runs the
stage once in the launching process whatever ``parallelism`` or ``NPROC_PER_NODE`` say; False
(train) plans the launch from ``parallelism.*`` and starts torchrun workers when more than one
process, or DeepSpeed, is asked for (:mod:`npu_recipes.runtime.launch`).

Only :mod:`npu_recipes.runner` (and bench/) imports this package. Stages import the feature
packages below them (train, plan, infer, serving, doctor, run, model, data, runtime, config) and
never each other.
"""

from __future__ import annotations

import importlib
from typing import ClassVar, NamedTuple, Optional, Protocol, runtime_checkable

from npu_recipes.config.schema import STAGES, RecipeConfig
from npu_recipes.errors import UserError
from npu_recipes.run.rundir import RunDir


class Prepared(NamedTuple):
    """What ``prepare`` hands to ``run``: the config with paths resolved (as the run directory's
    resolved.yaml holds it), and the run directory (None for stages that write none)."""

    config: RecipeConfig
    run_dir: Optional[RunDir]


@runtime_checkable
class Stage(Protocol):
    """The life cycle every stage module implements (see the package docstring)."""

    in_launcher_only: ClassVar[bool]

    def prepare(self, config: RecipeConfig, fresh_output_dir: bool) -> Prepared:
        """Resolve inputs and create the run directory, once, in the launching process.

        Raises:
            UserError: bad input found before anything loads.
        """

    def run(self, config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
        """Do the stage's work (in every worker for a multi-process train stage).

        Raises:
            UserError: bad input found while working.
        """


def load(name: str) -> Stage:
    """The stage called ``name`` (its module is imported only now, so a command pays only for its own stage).

    Raises:
        UserError: no such stage.
    """
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}", fix=f"choose stage= one of {', '.join(STAGES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    stage = module.STAGE
    if not isinstance(stage, Stage):
        raise TypeError(f"{module.__name__}.STAGE does not implement the Stage protocol")
    return stage
