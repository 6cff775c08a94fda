"""Continuing a training run from a checkpoint: ``resume=auto`` (the default), ``resume=never``, ``resume=PATH``.

* ``auto``: when ``output_dir`` already holds a run (its ``resolved.yaml``), the same command
  continues it in place from its newest complete checkpoint (from step 0 when the run died before
  its first save). Records logged after that checkpoint are dropped from logging.jsonl, since the
  resumed run logs those steps again; unfinished saves (``.partial-*``) are deleted. The Trainer
  restores the weights or adapter, optimizer, scheduler, RNG states and data position
  (``Trainer.train(resume_from_checkpoint=...)``), under DDP and DeepSpeed as in one process.
  A timestamped default ``output_dir`` is always new, so ``auto`` there starts a fresh run.
* ``never``: an ``output_dir`` that holds anything is refused.
* ``PATH``: a new run directory continues from the checkpoint at PATH (a branch of that run).

The rerun must train the same thing: a key outside :data:`MAY_CHANGE` that differs from the saved
``resolved.yaml`` is refused, naming each key with both values. The world size may not change:
each rank's RNG state and data shard, and under ZeRO each rank's optimizer partition, belong to
one world size.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from npu_recipes import atomic, checkpoints, config as config_module, rundir
from npu_recipes.errors import NothingToDo, UserError
from npu_recipes.rundir import RunDir
from npu_recipes.schema import RecipeConfig

log = logging.getLogger(__name__)

AUTO = "auto"
NEVER = "never"

MAY_CHANGE = (
    "resume", "description", "output_dir", "adapters", "load_data_args", "reference",
    "train.max_steps", "train.num_train_epochs", "train.save_steps", "train.logging_steps", "train.eval_steps",
    "train.save_total_limit", "train.report_to", "train.dataloader_num_workers",
    "parallelism.ddp_timeout", "parallelism.shutdown_timeout", "parallelism.master_addr", "parallelism.master_port",
    "nan_guard", "mfu", "merge", "infer", "serve", "doctor", "plan",
)
"""Keys (or whole sections) a resumed run may change: how long to train, how often to log and save,
and settings of other stages. Everything else must equal the saved run's."""

def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        flat: Dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _settings(config: RecipeConfig) -> Dict[str, Any]:
    return _flatten(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))


def _may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in MAY_CHANGE)


def changed_settings(saved: RecipeConfig, current: RecipeConfig) -> List[Tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every key outside :data:`MAY_CHANGE` that differs."""
    before, after = _settings(saved), _settings(current)
    return [
        (key, before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if not _may_change(key) and before.get(key) != after.get(key)
    ]


def _world_size(config: RecipeConfig) -> int:
    return config.parallelism.nproc_per_node * config.parallelism.nnodes


def check_compatible(saved: RecipeConfig, current: RecipeConfig, where: Path) -> None:
    """Refuse to continue the run saved in ``where`` with ``current`` settings that train something else.

    Raises:
        UserError: the world size differs (why it cannot change), or other keys differ (each named
            with its saved and current value).
    """
    if _world_size(saved) != _world_size(current):
        raise UserError(
            f"the run in {where} was trained with world size {_world_size(saved)} "
            f"(nproc_per_node={saved.parallelism.nproc_per_node}, nnodes={saved.parallelism.nnodes}); this launch has world size "
            f"{_world_size(current)}. Its checkpoints hold one RNG state and data position per rank"
            + (" and one ZeRO optimizer partition per rank" if saved.parallelism.zero_stage else "")
            + ", and the global batch would change",
            fix=f"resume with parallelism.nproc_per_node={saved.parallelism.nproc_per_node} "
            f"parallelism.nnodes={saved.parallelism.nnodes} (or NPROC_PER_NODE={saved.parallelism.nproc_per_node}), "
            "or start a new run with a new output_dir",
        )
    changes = changed_settings(saved, current)
    if changes:
        listed = "; ".join(f"{key}: {before!r} in the saved run, {after!r} now" for key, before, after in changes)
        raise UserError(
            f"cannot resume the run in {where} with different settings: {listed}",
            fix="rerun with the saved settings (see its resolved.yaml) to resume, or pass a new output_dir to start a new run",
        )


def _in_use_by(manifest: Dict[str, Any]) -> Optional[int]:
    """The pid of a live process on this host that is still running the run, else None."""
    pid = manifest.get("pid")
    if manifest.get("status") != "running" or not isinstance(pid, int) or manifest.get("host") != platform.node():
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user
    return pid


def _truncate_log(run_dir: RunDir, step: int) -> int:
    """Keep logging.jsonl's records up to ``step`` (no summary); returns how many were dropped."""
    records = run_dir.read_log()
    kept = [record for record in records if record.get("type") != "summary" and record.get("step", 0) <= step]
    if len(kept) != len(records):
        atomic.write_text(run_dir.path / rundir.LOGGING, "".join(json.dumps(record, allow_nan=False) + "\n" for record in kept))
    return len(records) - len(kept)


def _checked_checkpoint(path: str) -> Path:
    checkpoint = Path(path).expanduser().absolute()
    if not checkpoint.is_dir():
        raise UserError(f"resume={path}: no such checkpoint directory", fix="pass resume=RUN_DIR/checkpoint-N, resume=auto or resume=never")
    if not checkpoints.is_complete(checkpoint):
        raise UserError(
            f"resume={path} is not a complete checkpoint (a checkpoint-N directory holding {checkpoints.TRAINER_STATE})",
            fix="pass one of the checkpoint-N directories of a training run's output_dir",
        )
    return checkpoint


def _continue_in_place(config: RecipeConfig, path: Path) -> RunDir:
    run_dir = RunDir(path)
    try:
        saved = config_module.load_resolved(path / rundir.RESOLVED)
    except Exception as error:
        raise UserError(
            f"cannot resume the run in {path}: its {rundir.RESOLVED} is unreadable ({type(error).__name__}: {error})",
            fix="pass a new output_dir to start a new run, or restore that file",
        ) from None
    manifest = run_dir.read_manifest()
    pid = _in_use_by(manifest)
    if pid is not None:
        raise UserError(
            f"output_dir {path} is in use: process {pid} on this host is still training in it",
            fix=f"wait for it to finish, stop it (kill {pid}: it saves a checkpoint and exits), or pass another output_dir",
        )
    check_compatible(saved, config, path)
    found = run_dir.checkpoints()
    newest = found[-1] if found else None
    if manifest.get("status") == "completed" and not changed_settings_any(saved, config):
        raise _already_complete(path, newest)
    removed = checkpoints.remove_partials(path)
    step = checkpoints.step_of(newest) if newest else 0
    dropped = _truncate_log(run_dir, step)
    atomic.write_text(path / rundir.RESOLVED, config_module.to_yaml(config))
    resumes = manifest.get("resumes", [])
    resumes.append({"at": rundir.now(), "from_checkpoint": str(newest) if newest else None, "command": rundir.command_line()})
    run_dir.update_manifest(
        status="running", pid=os.getpid(), host=platform.node(), resume_from=str(newest) if newest else None,
        resumes=resumes, finished_at=None, error=None, final_metrics=None, stopped_at_step=None, last_checkpoint=None,
    )
    if newest:
        log.info("resuming the run in %s from %s (step %d)", path, newest.name, step)
    else:
        log.info("the run in %s saved no complete checkpoint: training it again from step 0", path)
    if removed or dropped:
        log.info("discarded %d unfinished save(s) %s and %d log record(s) after step %d", len(removed), removed, dropped, step)
    return run_dir


def changed_settings_any(saved: RecipeConfig, current: RecipeConfig) -> bool:
    """True when any key but ``resume`` differs (including those a resumed run may change)."""
    before, after = _settings(saved), _settings(current)
    return any(before.get(key) != after.get(key) for key in set(before) | set(after) if key != "resume")


def _already_complete(path: Path, checkpoint: Optional[Path]) -> NothingToDo:
    return NothingToDo(
        f"the run in {path} already completed" + (f" ({checkpoint.name})" if checkpoint else "")
        + "; nothing to train. Raise train.num_train_epochs or train.max_steps to train it further, or pass a new output_dir"
    )


def open_run_dir(config: RecipeConfig, fresh_output_dir: bool) -> RunDir:
    """The run directory a training run writes: new, or an existing one continued according to ``config.resume``.

    Sets ``resume_from`` in the manifest (a checkpoint path, or null) for the train stage's workers.

    Raises:
        UserError: ``resume`` names no complete checkpoint; the existing run is in use, was trained
            with other settings or world size (:func:`check_compatible`); ``output_dir`` holds
            something else.
        NothingToDo: the run in ``output_dir`` completed with these very settings.
    """
    if config.resume not in (AUTO, NEVER):
        checkpoint = _checked_checkpoint(config.resume)
        saved_config = checkpoint.parent / rundir.RESOLVED
        if saved_config.is_file():
            check_compatible(config_module.load_resolved(saved_config), config, checkpoint.parent)
        run_dir = rundir.create(config, fresh_output_dir)
        run_dir.update_manifest(resume_from=str(checkpoint))
        return run_dir
    path = Path(config.output_dir).expanduser().absolute()
    continuing = config.resume == AUTO and not fresh_output_dir and config.parallelism.node_rank == 0
    if continuing and (path / rundir.RESOLVED).is_file():
        return _continue_in_place(config, path)
    return rundir.create(config, fresh_output_dir)
