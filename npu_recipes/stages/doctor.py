"""Doctor stage: ``python -m npu_recipes stage=doctor [device=...] [parallelism.nproc_per_node=N] [doctor.format=json]``.

Checks this machine before a long run (:mod:`npu_recipes.doctor.checks`, docs/doctor.md) and
prints a table, or JSON with ``doctor.format=json``. Exit status 0 when nothing failed (warnings
allowed), 1 when a check failed; each warning or failure carries a one-line fix. It writes nothing:
no run directory.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

from npu_recipes.config.schema import RecipeConfig
from npu_recipes.doctor import checks, report
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
        found = checks.diagnose(config.device, config.parallelism)
        if config.doctor.format == "json":
            print(json.dumps(found.to_dict(), indent=2), flush=True)
        else:
            print(report.render_table(found), flush=True)
        if found.failed:
            sys.exit(EXIT_CHECK_FAILED)


STAGE = DoctorStage()
