"""Doctor stage: ``python -m npu_recipes stage=doctor [device=...] [parallelism.nproc_per_node=N] [doctor.format=json]``.

Checks this machine before a long run (:mod:`npu_recipes.doctor.checks`, docs/doctor.md) and
prints a table, or JSON with ``doctor.format=json``. Exit status 0 when nothing failed (warnings
allowed), 1 when a check failed; each warning or failure carries a one-line fix. It writes nothing:
no run directory.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

from npu_recipes.config.schema import RecipeConfig
from npu_recipes.doctor import checks, report
from npu_recipes.errors import UserError
from npu_recipes.plan import planner
from npu_recipes.run.rundir import RunDir
from npu_recipes.stages import Prepared

EXIT_CHECK_FAILED = 1


class DoctorStage:
    """Runs once, in the process the user started, whatever ``parallelism`` says: it checks the
    machine for an N-process run rather than being one."""

    in_launcher_only = True

    def prepare(self, config: RecipeConfig, fresh_output_dir: bool) -> Prepared:
        """The doctor resolves nothing and creates no run directory."""
        return Prepared(config, None)

    def run(self, config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
        """Run the checks, print them, and exit with status 1 when any failed."""
        found = checks.diagnose(config.device, config.parallelism, config.doctor.memory_used_warn, _planned_peak(config))
        if config.doctor.format == "json":
            print(json.dumps(found.to_dict(), indent=2), flush=True)
        else:
            print(report.render_table(found), flush=True)
        if found.failed:
            sys.exit(EXIT_CHECK_FAILED)


def _planned_peak(config: RecipeConfig) -> checks.PlannedPeak:
    """The run's planned peak per device (GiB) on a card of a given memory (what ``stage=plan`` estimates)."""

    def demand(device_type: str, memory_gib: float) -> float:
        if config.model.builder is not None and not (Path(config.model.name_or_path).expanduser() / "config.json").is_file():
            # The doctor builds nothing: the model is made by the first training run.
            raise UserError(f"model.builder={config.model.builder} has not built {config.model.name_or_path} yet")
        options = dataclasses.replace(config.plan, device_memory_gib=memory_gib)
        return planner.make(model=config.model, train_type=config.train_type, lora=config.lora, train=config.train,
                            parallelism=config.parallelism, device=device_type, options=options).demand_gib

    return demand


STAGE = DoctorStage()
