"""Plan stage: the resolved settings, the launch command and a per-device memory estimate.

Runs before any device is rented: it needs no accelerator and reads nothing of the model but
config.json (a local directory, or that one file fetched from the model's hub). It creates no run
directory and runs once in the process the user started, whatever the parallelism. When the
estimate does not fit the target device, it names the next option that does
(:mod:`npu_recipes.plan.planner`; printed by :mod:`npu_recipes.plan.report`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from npu_recipes import atomic
from npu_recipes.config.schema import RecipeConfig
from npu_recipes.errors import UserError
from npu_recipes.plan import launchers, planner, report
from npu_recipes.run.rundir import RunDir
from npu_recipes.stages import Prepared


class PlanStage:
    in_launcher_only = True

    def prepare(self, config: RecipeConfig, fresh_output_dir: bool) -> Prepared:
        """Nothing to prepare and no run directory: the plan only prints."""
        return Prepared(config, None)

    def run(self, config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
        """Print the plan (``plan.format``: text or json) to stdout.

        Raises:
            UserError: config.json cannot be read or fetched (see :func:`npu_recipes.model.pretrained.fetch_config`).
        """
        plan = planner.make(model=config.model, train_type=config.train_type, lora=config.lora, train=config.train,
                            parallelism=config.parallelism, device=config.device, options=config.plan)
        user_args, note = report.user_arguments(sys.argv[1:], config.model)
        launch = report.launch_for(config.parallelism, plan.target.device_type, user_args, config.output_dir, note)
        if config.plan.format == "json":
            print(json.dumps(report.to_dict(config, plan, launch), indent=2), flush=True)
        else:
            print(report.render_text(config, plan, launch), flush=True)
        if config.plan.launcher != "none":
            _write_job_file(config, plan.target.device_type, user_args)


def _write_job_file(config: RecipeConfig, device_type: str, user_args) -> None:
    """Write the scheduler's job file (``plan.launcher``) and say where, on stderr (stdout stays the plan)."""
    path = Path(config.plan.launcher_file or launchers.default_file(config.recipe, config.plan.launcher)).expanduser()
    text = launchers.render(config.plan.launcher, config.recipe, config.parallelism, device_type, user_args, config.plan.image)
    try:
        atomic.write_text(path, text)
    except OSError as error:
        raise UserError(f"cannot write plan.launcher_file {path}: {error.strerror}", fix="pass a writable plan.launcher_file=PATH") from None
    print(f"wrote the {config.plan.launcher} job file {path}", file=sys.stderr, flush=True)


STAGE = PlanStage()
