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
  Rerunning the same command with the branch's ``output_dir`` continues the branch in place.

The rerun must train the same thing: a key outside :data:`MAY_CHANGE` that differs from the saved
``resolved.yaml`` is refused, naming each key with both values. The world size may not change:
each rank's RNG state and data shard, and under ZeRO each rank's optimizer partition, belong to
one world size. Nor may the dataset (its row and token counts, recorded in the manifest): the
data position would point into other data. Only one process trains in a run directory at a time
(:mod:`npu_recipes.run.lock`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from npu_recipes import atomic
from npu_recipes.config.resolved import RESOLVED, load_resolved, to_yaml
from npu_recipes.config.schema import RecipeConfig
from npu_recipes.errors import NothingToDo, UserError
from npu_recipes.run import checkpoints, manifest, rundir
from npu_recipes.run.manifest import DatasetRecord, ResumeRecord
from npu_recipes.run.rundir import RunDir, claim

log = logging.getLogger(__name__)

AUTO = "auto"
NEVER = "never"

MAY_CHANGE = (
    "resume", "resume_weights_only", "description", "output_dir", "adapters", "load_data_args", "reference",
    "train.max_steps", "train.num_train_epochs", "train.save_steps", "train.logging_steps", "train.eval_steps",
    "train.save_total_limit", "train.report_to", "train.dataloader_num_workers", "train.gradient_checkpointing",
    "train.save_only_model", "train.load_best_model_at_end",
    "parallelism.ddp_timeout", "parallelism.shutdown_timeout", "parallelism.stop_timeout", "parallelism.master_addr", "parallelism.master_port",
    "nan_guard", "mfu", "merge", "infer", "serve", "doctor", "plan",
)
"""Keys (or whole sections) a resumed run may change: how long to train, how often to log and save,
whether to recompute activations (what an out-of-memory error advises first; it changes memory,
not results), and settings of other stages. Everything else must equal the saved run's."""

DATASET_COUNTS = ("rows", "train", "validation", "train_tokens")
"""Counts of the manifest's ``dataset`` entry that must be unchanged on resume (content-derived, so
touching or copying the data file does not count as a change, unlike HF datasets' fingerprint)."""

def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        flat: Dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _settings(config: RecipeConfig) -> Dict[str, Any]:
    return _flatten(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))


def may_change(key: str) -> bool:
    """True when a resumed run may change the dotted config ``key`` (see :data:`MAY_CHANGE`)."""
    return any(key == allowed or key.startswith(allowed + ".") for allowed in MAY_CHANGE)


def _differences(saved: RecipeConfig, current: RecipeConfig) -> List[Tuple[str, Any, Any]]:
    before, after = _settings(saved), _settings(current)
    return [(key, before.get(key), after.get(key)) for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


def changed_settings(saved: RecipeConfig, current: RecipeConfig) -> List[Tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every key outside :data:`MAY_CHANGE` that differs."""
    return [difference for difference in _differences(saved, current) if not may_change(difference[0])]


def _parallelism_override(saved: RecipeConfig, current: RecipeConfig) -> str:
    return "" if saved.parallelism.name == current.parallelism.name else f"parallelism={saved.parallelism.name} "


def check_compatible(saved: RecipeConfig, current: RecipeConfig, where: Path) -> None:
    """Refuse to continue the run saved in ``where`` with ``current`` settings that train something else.

    Raises:
        UserError: the world size differs (why it cannot change), or other keys differ (each named
            with its saved and current value).
    """
    if saved.parallelism.world_size != current.parallelism.world_size:
        raise UserError(
            f"the run in {where} was trained with world size {saved.parallelism.world_size} "
            f"(nproc_per_node={saved.parallelism.nproc_per_node}, nnodes={saved.parallelism.nnodes}); this launch has world size "
            f"{current.parallelism.world_size}. Its checkpoints hold one RNG state and data position per rank"
            + (" and one ZeRO optimizer partition per rank" if saved.parallelism.zero_stage else "")
            + ", and the global batch would change",
            fix=f"resume with {_parallelism_override(saved, current)}parallelism.nproc_per_node={saved.parallelism.nproc_per_node} "
            f"parallelism.nnodes={saved.parallelism.nnodes} (or {_parallelism_override(saved, current)}"
            f"NPROC_PER_NODE={saved.parallelism.nproc_per_node}), "
            "or start a new run with a new output_dir",
        )
    changes = changed_settings(saved, current)
    if changes:
        listed = "; ".join(f"{key}: {before!r} in the saved run, {after!r} now" for key, before, after in changes)
        raise UserError(
            f"cannot resume the run in {where} with different settings: {listed}",
            fix="rerun with the saved settings (see its resolved.yaml) to resume, or start a new run from step 0 "
            "(a new output_dir, and resume=never instead of resume=PATH)",
        )


def _truncate_log(run_dir: RunDir, step: int) -> int:
    """Keep logging.jsonl's records up to ``step`` (no summary), dropping damaged lines (a write cut
    short by a crash or a full disk); returns how many records or lines were dropped."""
    records, damaged = run_dir.read_log(skip_damaged=True)
    kept = [record for record in records if record.get("type") != "summary" and record.get("step", 0) <= step]
    if damaged:
        log.warning("%s: dropped %d damaged line(s) (numbers %s)", rundir.LOGGING, len(damaged), damaged)
    if len(kept) != len(records) or damaged:
        atomic.write_text(run_dir.path / rundir.LOGGING, "".join(json.dumps(record, allow_nan=False) + "\n" for record in kept))
    return len(records) - len(kept) + len(damaged)


def _checked_checkpoint(path: str) -> Path:
    checkpoint = Path(path).expanduser().absolute()
    if not checkpoint.is_dir():
        raise UserError(f"resume={path}: no such checkpoint directory", fix="pass resume=RUN_DIR/checkpoint-N, resume=auto or resume=never")
    if any(part.startswith(checkpoints.PARTIAL_PREFIX) for part in checkpoint.parts):
        raise UserError(
            f"resume={path} is inside an unfinished save ({checkpoints.PARTIAL_PREFIX}*), which a resumed run deletes",
            fix="pass one of the complete checkpoint-N directories of the run",
        )
    if (checkpoint / RESOLVED).is_file():
        found = checkpoints.complete(checkpoint)
        raise UserError(
            f"resume={path} is a run directory, not a checkpoint",
            fix=(f"pass resume={found[-1]} (its newest complete checkpoint), or output_dir={path} resume=auto to continue that run in place"
                 if found else f"pass output_dir={path} resume=auto to continue that run in place"),
        )
    if not checkpoints.is_complete(checkpoint):
        raise UserError(
            f"resume={path} is not a complete checkpoint (a checkpoint-N directory holding {checkpoints.TRAINER_STATE})",
            fix="pass one of the checkpoint-N directories of a training run's output_dir",
        )
    damage = checkpoints.damage(checkpoint)
    if damage:
        raise UserError(f"resume={path}: {damage}", fix="pass an older checkpoint-N of the same run")
    return checkpoint


def _check_steps_left(config: RecipeConfig, checkpoint: Path, where: str, branch: bool) -> None:
    """Refuse a checkpoint past ``train.max_steps`` (training cannot go backwards) or, for a new
    branch (``branch``), one already at it (the branch would have nothing to train)."""
    step = checkpoints.step_of(checkpoint)
    limit = config.train.max_steps
    if limit <= 0 or step < limit or (step == limit and not branch):
        return
    raise UserError(
        f"{where} has already trained {step} steps ({checkpoint.name}), "
        + ("more than" if step > limit else "as many as") + f" train.max_steps={limit}: nothing to train",
        fix=f"pass train.max_steps above {step} to train it further"
        + (f", or resume=RUN_DIR/checkpoint-N (one before step {limit}) with a new output_dir" if step > limit else ""),
    )


def _check_same_dataset(saved: Optional[DatasetRecord], counts: Optional[Dict[str, int]], where: Path) -> None:
    if counts is None or saved is None:
        return
    differences = [
        f"{key}: {getattr(saved, key)} in the saved run, {counts[key]} now"
        for key in DATASET_COUNTS if key in counts and getattr(saved, key) != counts[key]
    ]
    if differences:
        raise UserError(
            f"cannot resume the run in {where}: its dataset changed since it was trained ({'; '.join(differences)}), "
            "so its checkpoints' position in the data means nothing now",
            fix=f"restore the data it was trained on ({saved.path or 'see its manifest.json'}), or pass a new "
            "output_dir to train on this data (add resume=RUN_DIR/checkpoint-N to start from that checkpoint's weights)",
        )


def _saved_config(path: Path) -> RecipeConfig:
    try:
        return load_resolved(path / RESOLVED)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise UserError(
            f"cannot resume the run in {path}: its {RESOLVED} is unreadable ({type(error).__name__}: {first_line})",
            fix="restore that file, or pass a new output_dir (and no resume=PATH into that run) to start a new run",
        ) from None


def _newest_usable(run_dir: RunDir) -> Optional[Path]:
    """The newest complete checkpoint whose trainer state is readable; damaged newer ones are reported and skipped."""
    for checkpoint in reversed(run_dir.checkpoints()):
        damage = checkpoints.damage(checkpoint)
        if not damage:
            return checkpoint
        log.warning("not resuming from %s: %s", checkpoint.name, damage)
    return None


def _check_resume_state(config: RecipeConfig, checkpoint: Path) -> None:
    """Refuse to continue from ``checkpoint`` when it lacks what an exact resume restores, unless
    ``resume_weights_only`` asks for its weights alone."""
    if config.resume_weights_only:
        return
    missing = checkpoints.missing_resume_state(checkpoint, config.parallelism.world_size, config.parallelism.zero_stage is not None)
    if missing:
        raise UserError(
            f"cannot resume exactly from {checkpoint}: it lacks {', '.join(missing)} (the optimizer's moments, the "
            "learning-rate schedule's position and the random state), as a train.save_only_model=true save, a partial "
            "copy or a clean-up leaves a checkpoint; continuing would restart the optimizer and the schedule",
            fix="restore those files from the original checkpoint, or add resume_weights_only=true to continue from its "
            "weights alone (fresh optimizer moments; the learning rate continues its schedule)",
        )


def _continuation(config: RecipeConfig, path: Path):
    """Everything about continuing the run in ``path`` that needs no data: the lock, the saved
    settings, completion, the checkpoint to start from and its contents.

    Returns:
        ``(saved config, manifest, newest usable checkpoint or None, checkpoint to start from or None)``.
    """
    claim(path)
    saved = _saved_config(path)
    recorded = manifest.read(path)
    check_compatible(saved, config, path)
    newest = _newest_usable(RunDir(path))
    if recorded.status == manifest.COMPLETED and not changed_settings_any(saved, config):
        raise _already_complete(path, newest)
    origin = recorded.branched_from
    if newest is None and origin and (not checkpoints.is_complete(Path(origin)) or checkpoints.damage(Path(origin))):
        raise UserError(
            f"the run in {path} saved no checkpoint of its own, and the checkpoint it branched off, {origin}, is gone or damaged",
            fix="pass a new output_dir, with resume= another checkpoint to branch from or none to start over",
        )
    start = newest or (Path(origin) if origin else None)
    if start is not None:
        _check_steps_left(config, start, f"the run in {path}", branch=False)
        _check_resume_state(config, start)
    return saved, recorded, newest, start


def _continue_in_place(config: RecipeConfig, path: Path, dataset_counts: Optional[Dict[str, int]]) -> Tuple[RunDir, RecipeConfig]:
    run_dir = RunDir(path)
    config = dataclasses.replace(config, output_dir=str(path))
    _, recorded, newest, start = _continuation(config, path)
    _check_same_dataset(recorded.dataset, dataset_counts, path)
    removed = checkpoints.remove_partials(path)
    step = checkpoints.step_of(start) if start else 0
    dropped = _truncate_log(run_dir, step)
    atomic.write_text(path / RESOLVED, to_yaml(config))
    weights_only = bool(start) and config.resume_weights_only
    resumed = ResumeRecord(at=manifest.now(), from_checkpoint=str(start) if start else None, command=manifest.command_line(),
                           weights_only=weights_only)
    run_dir.update_manifest(
        status=manifest.RUNNING, pid=os.getpid(), host=platform.node(), resume_from=str(start) if start else None,
        resume_weights_only=weights_only, resumes=[*recorded.resumes, resumed], finished_at=None, error=None,
        final_metrics=None, stopped_at_step=None, last_checkpoint=None,
    )
    how = " (its weights alone: resume_weights_only=true)" if weights_only else ""
    if newest:
        log.info("resuming the run in %s from %s (step %d)%s", path, newest.name, step, how)
    elif start:
        log.info("the run in %s saved no complete checkpoint: continuing it from %s (step %d), where it branched off%s", path, start, step, how)
    else:
        log.info("the run in %s saved no complete checkpoint: training it again from step 0", path)
    if removed or dropped:
        log.info("discarded %d unfinished save(s) %s and %d log record(s) after step %d", len(removed), removed, dropped, step)
    return run_dir, config


def changed_settings_any(saved: RecipeConfig, current: RecipeConfig) -> bool:
    """True when any key but ``resume`` differs (including those a resumed run may change)."""
    return any(key != "resume" for key, _, _ in _differences(saved, current))


def _already_complete(path: Path, checkpoint: Optional[Path]) -> NothingToDo:
    return NothingToDo(
        f"the run in {path} already completed" + (f" ({checkpoint.name})" if checkpoint else "")
        + "; nothing to train. Raise train.num_train_epochs or train.max_steps to train it further, or pass a new output_dir"
    )


def _branch_of(path: Path) -> Optional[str]:
    """The checkpoint the run in ``path`` branched off (``resume=PATH``), if it holds such a run."""
    if not (path / RESOLVED).is_file():
        return None
    return manifest.read(path).branched_from


def check_before_data(config: RecipeConfig, fresh_output_dir: bool) -> None:
    """Run the checks of :func:`open_run_dir` that need no data, so that a run that cannot start or
    continue is refused before its dataset is tokenized: the checkpoint ``resume`` names, the run
    already in ``output_dir`` (in use, other settings, completed, its checkpoint's contents) or an
    ``output_dir`` that cannot be created. Holds the run's lock when it continues a run; writes nothing
    (a write probe in the output location is removed at once).

    Raises:
        UserError, NothingToDo: as :func:`open_run_dir` would.
    """
    path = Path(config.output_dir).expanduser().absolute()
    own_directory = not fresh_output_dir and config.parallelism.node_rank == 0
    if config.resume not in (AUTO, NEVER):
        checkpoint = _checked_checkpoint(config.resume)
        if own_directory and _branch_of(path) == str(checkpoint):
            _continuation(dataclasses.replace(config, output_dir=str(path)), path)
            return
        _check_branch_start(config, checkpoint)
    elif config.resume == AUTO and own_directory and (path / RESOLVED).is_file():
        _continuation(dataclasses.replace(config, output_dir=str(path)), path)
        return
    if config.parallelism.node_rank == 0 or not (path / RESOLVED).is_file():
        rundir.check_creatable(path, fresh_output_dir)


def _check_branch_start(config: RecipeConfig, checkpoint: Path) -> None:
    _check_steps_left(config, checkpoint, f"resume={config.resume}", branch=True)
    if (checkpoint.parent / RESOLVED).is_file():
        check_compatible(_saved_config(checkpoint.parent), config, checkpoint.parent)
    _check_resume_state(config, checkpoint)


def open_run_dir(config: RecipeConfig, fresh_output_dir: bool,
                 dataset_counts: Optional[Dict[str, int]] = None) -> Tuple[RunDir, RecipeConfig]:
    """The run directory a training run writes: new, or an existing one continued according to ``config.resume``;
    and ``config`` as its resolved.yaml holds it (``output_dir`` absolute).

    Sets ``resume_from`` in the manifest (a checkpoint path, or null) for the train stage's workers.
    With ``resume=PATH`` and an ``output_dir`` that holds the branch started from that very
    checkpoint, the branch is continued in place (so rerunning a stopped command resumes it).

    Args:
        dataset_counts: this launch's dataset counts (:attr:`npu_recipes.data.tokenize.TokenizedSplits.counts`),
            compared with the saved run's before continuing it.

    Raises:
        UserError: ``resume`` names no usable checkpoint or one past ``train.max_steps``; the
            existing run is in use, was trained with other settings, world size or dataset
            (:func:`check_compatible`); ``output_dir`` holds something else.
        NothingToDo: the run in ``output_dir`` completed with these very settings.
    """
    path = Path(config.output_dir).expanduser().absolute()
    if config.parallelism.node_rank > 0:
        # Node 0 decides how the run starts or resumes and records it; other nodes join its directory.
        return rundir.create(config, fresh_output_dir)
    own_directory = not fresh_output_dir
    if config.resume not in (AUTO, NEVER):
        checkpoint = _checked_checkpoint(config.resume)
        if own_directory and _branch_of(path) == str(checkpoint):
            return _continue_in_place(config, path, dataset_counts)
        _check_branch_start(config, checkpoint)
        run_dir, config = rundir.create(config, fresh_output_dir)
        run_dir.update_manifest(resume_from=str(checkpoint), branched_from=str(checkpoint), resume_weights_only=config.resume_weights_only)
        return run_dir, config
    if config.resume == AUTO and own_directory and (path / RESOLVED).is_file():
        return _continue_in_place(config, path, dataset_counts)
    return rundir.create(config, fresh_output_dir)
