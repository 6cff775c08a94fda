"""Checkpoint directories in a run directory: written whole or not at all, found, and rotated.

The Trainer writes ``checkpoint-<N>`` in place, so a process killed mid-save would leave a
directory that looks like a checkpoint but lacks its optimizer or trainer state. Here a checkpoint
is written inside ``.partial-checkpoint-<N>/`` and renamed to ``checkpoint-<N>`` by global rank 0
once every rank has finished writing (a rename within one filesystem is atomic on POSIX). A
leftover ``.partial-*`` directory is never read and is removed when the run resumes.

A checkpoint is *complete* when its name is ``checkpoint-<N>`` and it holds ``trainer_state.json``
(the last file the Trainer writes), so checkpoints from before this scheme, or copied by hand,
count only when whole.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

PREFIX = "checkpoint-"
PARTIAL_PREFIX = ".partial-"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"checkpoint-(\d+)")


OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""errno values of a write that failed for lack of room: no space left, quota exceeded, file too large."""


def is_out_of_space(error: OSError) -> bool:
    """True for a write that failed because the filesystem (or a quota or file-size limit) is full."""
    return error.errno in OUT_OF_SPACE


def step_of(path: Path) -> Optional[int]:
    """The step ``N`` of a directory named ``checkpoint-<N>``, else None (``checkpoint-5-merged`` is not one)."""
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """True for a ``checkpoint-<N>`` directory that holds ``trainer_state.json``."""
    path = Path(path)
    return step_of(path) is not None and (path / TRAINER_STATE).is_file()


def complete(run_dir: Path) -> List[Path]:
    """The complete checkpoints in ``run_dir``, oldest step first."""
    found = [path for path in Path(run_dir).glob(f"{PREFIX}*") if path.is_dir() and is_complete(path)]
    return sorted(found, key=step_of)


def staging_root(run_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place."""
    return Path(run_dir) / f"{PARTIAL_PREFIX}{PREFIX}{step}"


def _fsync_directory(path: Path) -> None:
    # A rename is durable only once its directory entry is on disk.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(staging: Path, target: Path) -> None:
    """Rename the finished checkpoint ``staging`` to ``target``, replacing an older ``target``.

    An existing ``target`` (left by a branch of the run that was resumed from an earlier step) is
    moved aside first and deleted only after the rename, so ``target`` is always one whole checkpoint.
    The now empty staging root is removed.
    """
    target = Path(target)
    retired = target.with_name(f"{PARTIAL_PREFIX}replaced-{target.name}")
    if target.exists():
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(target, retired)
    os.rename(staging, target)
    _fsync_directory(target.parent)
    shutil.rmtree(retired, ignore_errors=True)
    root = Path(staging).parent
    if root.name.startswith(PARTIAL_PREFIX) and not any(root.iterdir()):
        root.rmdir()


def remove_partials(run_dir: Path) -> List[str]:
    """Delete every ``.partial-*`` directory in ``run_dir`` (saves that never finished); returns their names."""
    removed = []
    for path in Path(run_dir).glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return sorted(removed)


def best_step(log_history: Iterable[dict], saved_steps: Sequence[int]) -> Optional[int]:
    """The saved step with the lowest ``eval_loss`` in the Trainer's ``log_history`` (None without evaluations).

    Ties go to the earlier step.
    """
    saved = set(saved_steps)
    scored = [(entry["eval_loss"], entry["step"]) for entry in log_history if "eval_loss" in entry and entry.get("step") in saved]
    return min(scored)[1] if scored else None


def rotate(run_dir: Path, save_total_limit: Optional[int], best: Optional[int]) -> List[Path]:
    """Delete the oldest complete checkpoints beyond ``save_total_limit``, never the newest or the best.

    ``best`` is the step of the best checkpoint (see :func:`best_step`). So with a limit of 1 and a
    best checkpoint older than the newest, two remain. ``None`` or a limit below 1 deletes nothing
    (transformers' meaning of ``save_total_limit``). Returns the deleted directories.
    """
    if not save_total_limit or save_total_limit < 1:
        return []
    found = complete(run_dir)
    protected = {found[-1]} if found else set()
    protected |= {path for path in found if step_of(path) == best}
    deletable = [path for path in found if path not in protected]
    excess = len(found) - max(save_total_limit, len(protected))
    doomed = deletable[:max(excess, 0)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed
