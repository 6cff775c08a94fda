"""The thin runner: hand a validated config to its stage, and keep the run directory honest."""

from __future__ import annotations

from npu_recipes import rundir, stages
from npu_recipes.errors import UserError
from npu_recipes.schema import RecipeConfig


def run(config: RecipeConfig, fresh_output_dir: bool) -> None:
    """Prepare once, then run ``config.stage`` in this process.

    When the stage fails, the run directory's manifest says ``failed`` with the reason; a run that
    failed on bad input before its first checkpoint leaves no directory at all.

    Args:
        config: the validated, resolved config.
        fresh_output_dir: True when ``output_dir`` is the default timestamped path, which may be
            suffixed to avoid a collision; an explicit ``output_dir`` is used as given.
    """
    stage = stages.load(config.stage)
    world_size = config.parallelism.nproc_per_node * config.parallelism.nnodes
    if stages.needs_workers(stage, world_size):
        raise UserError(
            f"parallelism={config.parallelism.name} with {world_size} processes needs the torchrun launcher, "
            "which this build does not have yet",
            fix="use parallelism=single",
        )
    run_dir = stage.prepare(config, fresh_output_dir)
    try:
        stage.run(config, run_dir)
    except UserError as error:
        if run_dir is not None:
            run_dir.update_manifest(status="failed", finished_at=rundir.now(), error=str(error))
            run_dir.discard_if_empty_of_results()
        raise
    except BaseException as error:
        if run_dir is not None:
            run_dir.update_manifest(status="failed", finished_at=rundir.now(), error=f"{type(error).__name__}: {error}")
        raise
