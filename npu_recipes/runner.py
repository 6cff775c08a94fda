"""The thin runner: check the launch, prepare once, then run the stage in this process or in torchrun workers.

The only module that imports :mod:`npu_recipes.stages`; the CLI (:mod:`npu_recipes.cli`) and every
torchrun worker (:mod:`npu_recipes.worker`) come through here.
"""

from __future__ import annotations

import shlex
import sys
from typing import Optional

from npu_recipes import errors, stages
from npu_recipes.config.resolved import RESOLVED
from npu_recipes.config.schema import RecipeConfig
from npu_recipes.errors import EXIT_USER_ERROR, Interrupted, LostPeer, RunStopped, Terminated, UserError
from npu_recipes.run import manifest, shared_storage
from npu_recipes.run.manifest import LaunchRecord
from npu_recipes.run.rundir import RunDir
from npu_recipes.runtime import devices, launch


def run(config: RecipeConfig, fresh_output_dir: bool) -> None:
    """Plan the launch, prepare once, then run ``config.stage``.

    A stage that runs in the launcher only, or one process without DeepSpeed, runs here; anything
    else starts torchrun workers (:mod:`npu_recipes.runtime.launch`), each of which loads the
    ``resolved.yaml`` written by prepare. Every check that needs no worker (the environment, visible
    devices, the device's runtime) happens before prepare, so such a mistake leaves no run directory.

    Args:
        config: the validated, resolved config.
        fresh_output_dir: True when ``output_dir`` is the default timestamped path, which may be
            suffixed to avoid a collision; an explicit ``output_dir`` is used as given.

    Raises:
        UserError: bad input found here or by the stage.
        SystemExit: a worker failed (with that worker's exit status) or a signal stopped the workers
            (128 + the signal's number).
    """
    devices.set_aside_unloadable_torch_npu(config.device)
    devices.name_deepspeed_accelerator(config.device)
    stage = stages.load(config.stage)
    plan = None if stage.in_launcher_only else launch.plan_launch(
        config.parallelism, config.device, config.recipe, config.output_dir)
    config, run_dir = stage.prepare(config, fresh_output_dir)
    if plan is None or plan.in_process or run_dir is None:
        run_stage(stage, config, run_dir)
        return
    parallel = config.parallelism
    owns_manifest = parallel.node_rank == 0
    if owns_manifest:
        command = shlex.join(plan.command(run_dir.path / RESOLVED))
        run_dir.update_manifest(launch=LaunchRecord(plan.world_size, parallel.nproc_per_node, parallel.nnodes, command))
        if parallel.nnodes > 1:
            shared_storage.write_token(run_dir.path)
    try:
        launch.launch(parallel, plan, run_dir.path)
    except launch.WorkersFailed as failure:
        status = run_dir.read_manifest().status if run_dir.path.is_dir() else None
        # Rank 0 printed how an interrupted run stopped and where it saved.
        if not failure.reported and status != manifest.INTERRUPTED:
            errors.print_block(f"npu_recipes: error: {failure}")
        if owns_manifest and status == manifest.RUNNING:
            run_dir.update_manifest(status=manifest.FAILED, finished_at=manifest.now(), error=str(failure).split("\n")[0])
        if owns_manifest and failure.exit_code == EXIT_USER_ERROR:
            # Bad input in the workers: the launcher removes the run's records, once every worker has
            # exited (a worker removing them could pull resolved.yaml from under a rank still starting).
            run_dir.discard_if_empty_of_results()
        sys.exit(failure.exit_code)


def run_worker(config: RecipeConfig, run_dir: RunDir, rank: int) -> None:
    """Run ``config.stage`` in torchrun worker ``rank`` (global); rank 0 records a failure in the manifest."""
    devices.set_aside_unloadable_torch_npu(config.device)
    run_stage(stages.load(config.stage), config, run_dir, records_failure=rank == 0, discards=False)


def run_stage(stage: stages.Stage, config: RecipeConfig, run_dir: Optional[RunDir], records_failure: bool = True,
              discards: bool = True) -> None:
    """Run ``stage`` on ``config`` in this process and keep the run directory honest.

    When the stage fails and ``records_failure`` is set (the single process, or rank 0 of a
    torchrun job), the manifest says ``failed`` with the reason; a run that failed on bad input
    before its first checkpoint leaves no directory at all (removed here when ``discards``, else by
    the launcher after every worker has exited); a run that stopped itself
    (:class:`RunStopped`) keeps its directory and records; one stopped by a signal after saving
    (:class:`Interrupted`) was recorded by the stage as ``interrupted``.
    """
    try:
        stage.run(config, run_dir)
    except Interrupted:
        raise
    except UserError as error:
        if run_dir is not None and records_failure:
            _record(run_dir, manifest.FAILED, str(error))
            if discards and not isinstance(error, RunStopped):
                run_dir.discard_if_empty_of_results()
        raise
    except (KeyboardInterrupt, Terminated) as error:
        if run_dir is not None and records_failure:
            # Stopped by the user outside a step's end (loading, tokenizing, or a second Ctrl-C that
            # abandoned the save): not a failure; the newest complete checkpoint is where a rerun resumes.
            _record(run_dir, manifest.INTERRUPTED, "interrupted (SIGINT)" if isinstance(error, KeyboardInterrupt) else "terminated (SIGTERM)")
        raise
    except BaseException as error:
        if run_dir is not None and records_failure:
            _record(run_dir, manifest.FAILED, error.message if isinstance(error, LostPeer) else f"{type(error).__name__}: {error}")
        raise


def _record(run_dir: RunDir, status: str, reason: str) -> None:
    """Mark the manifest ``status`` (failed or interrupted) with ``reason`` and, when interrupted, the newest
    complete checkpoint; on a full disk, where even that write fails, say so instead."""
    try:
        extra = {}
        if status == manifest.INTERRUPTED:
            saved = run_dir.checkpoints()
            extra["last_checkpoint"] = str(saved[-1]) if saved else None
        run_dir.update_manifest(status=status, finished_at=manifest.now(), error=reason, **extra)
    except OSError as error:
        print(f"npu_recipes: warning: could not record the failure in {run_dir.manifest_path}: {error.strerror}",
              file=sys.stderr, flush=True)
