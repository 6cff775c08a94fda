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

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from npu_recipes.errors import OUT_OF_SPACE, UserError

PREFIX = "checkpoint-"
PARTIAL_PREFIX = ".partial-"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"checkpoint-(\d+)")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
"""transformers' optimizer state file (``optimizer.bin`` from older releases)."""
SCHEDULER_FILE = "scheduler.pt"
DEEPSPEED_STATES = "global_step*"
"""DeepSpeed's ``save_checkpoint`` folder in a checkpoint (model and optimizer partitions of every rank)."""


def missing_resume_state(checkpoint: Path, world_size: int, deepspeed: bool) -> List[str]:
    """The files an exact resume from ``checkpoint`` needs but that are absent, as the Trainer writes them:
    the optimizer state (``optimizer.pt``, or DeepSpeed's ``global_step<N>/`` folder), ``scheduler.pt``,
    the RNG state (``rng_state.pth``, or ``rng_state_<rank>.pth`` per rank when ``world_size`` > 1) and
    ``trainer_state.json``. transformers skips whichever is absent without a word, restarting
    AdamW's moments, the learning-rate schedule or the random streams; ``save_only_model`` writes none
    of the first three."""
    checkpoint = Path(checkpoint)
    missing = []
    if deepspeed:
        if not any(path.is_dir() for path in checkpoint.glob(DEEPSPEED_STATES)):
            missing.append(f"global_step{step_of(checkpoint) or '<N>'}/ (DeepSpeed's optimizer states)")
    elif not any((checkpoint / name).is_file() for name in OPTIMIZER_FILES):
        missing.append(OPTIMIZER_FILES[0])
    rng = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    missing += [name for name in (SCHEDULER_FILE, *rng, TRAINER_STATE) if not (checkpoint / name).is_file()]
    return missing


_OUT_OF_SPACE_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122",
                       "File too large", "os error 27")
# torch.save reports a failed write as a C++ stream error that does not say why.
_UNEXPLAINED_WRITE_FAILURES = ("iostream error", "unexpected pos", "PytorchStreamWriter failed")
LOW_SPACE_BYTES = 256 * 2**20
"""Below this much free space (256 MiB), an unexplained write failure is taken for a full disk."""


def is_out_of_space(error: BaseException, directory: Path) -> bool:
    """True for a write into ``directory`` that failed because its filesystem (or a quota or the
    process's file-size limit) is full.

    Writers report it differently: ``OSError`` with ENOSPC/EDQUOT/EFBIG (Python's own files),
    ``SafetensorError`` with the OS message ("No space left on device (os error 28)"), and
    ``torch.save`` a ``RuntimeError`` naming only a stream failure; the last counts when the
    filesystem has under :data:`LOW_SPACE_BYTES` free or a file-size limit is set.
    """
    if isinstance(error, OSError) and error.errno in OUT_OF_SPACE:
        return True
    text = str(error)
    if any(words in text for words in _OUT_OF_SPACE_WORDS):
        return True
    if not any(words in text for words in _UNEXPLAINED_WRITE_FAILURES):
        return False
    import resource

    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = 0
    return free < LOW_SPACE_BYTES or resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY


def step_of(path: Path) -> Optional[int]:
    """The step ``N`` of a directory named ``checkpoint-<N>``, else None (``checkpoint-5-merged`` is not one)."""
    match = _NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """True for a ``checkpoint-<N>`` directory that holds ``trainer_state.json``."""
    path = Path(path)
    return step_of(path) is not None and (path / TRAINER_STATE).is_file()


def damage(path: Path) -> Optional[str]:
    """What is wrong with complete checkpoint ``path``'s ``trainer_state.json`` (None when it reads as
    the Trainer wrote it). Renaming makes a checkpoint whole against a killed process; this catches
    the rest (a hand edit, a filesystem that lost data)."""
    state_path = Path(path) / TRAINER_STATE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"its {TRAINER_STATE} is unreadable ({type(error).__name__}: {error})"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return f"its {TRAINER_STATE} holds no global_step"
    return None


def complete(run_dir: Path) -> List[Path]:
    """The complete checkpoints in ``run_dir``, oldest step first."""
    found = [path for path in Path(run_dir).glob(f"{PREFIX}*") if path.is_dir() and is_complete(path)]
    return sorted(found, key=step_of)


def staging_root(run_dir: Path, step: int) -> Path:
    """Where checkpoint ``step`` is written before it is renamed into place."""
    return Path(run_dir) / f"{PARTIAL_PREFIX}{PREFIX}{step}"


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    # After a power loss, a rename that reached the disk must not point at files that did not.
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def publish(staging: Path, target: Path) -> None:
    """Rename the finished checkpoint ``staging`` to ``target``, replacing an older ``target``.

    An existing ``target`` (left by a branch of the run that was resumed from an earlier step) is
    moved aside first and deleted only after the rename, so ``target`` is always one whole checkpoint.
    Every file is flushed to disk before the rename and the rename after it, so after a crash of
    the machine too ``target`` is whole or absent. The now empty staging root is removed.
    """
    target = Path(target)
    _fsync_tree(staging)
    retired = target.with_name(f"{PARTIAL_PREFIX}replaced-{target.name}")
    if target.exists():
        shutil.rmtree(retired, ignore_errors=True)
        os.rename(target, retired)
    os.rename(staging, target)
    _fsync(target.parent)
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


def metric_key(metric: str) -> str:
    """The logged name of ``train.metric_for_best_model`` (transformers adds ``eval_`` to a bare name)."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


def greater_is_better(metric: str, setting: Optional[bool]) -> bool:
    """``train.greater_is_better``, or when unset transformers' rule: lower is better for a loss."""
    return setting if setting is not None else not metric.endswith("loss")


def best_evaluation(log_history: Iterable[dict], metric: str = "eval_loss", greater: bool = False,
                    steps: Optional[Sequence[int]] = None) -> Optional[Tuple[int, float]]:
    """``(step, value)`` of the best evaluation in the Trainer's ``log_history`` by ``metric``
    (:func:`metric_key`; the highest value when ``greater``, else the lowest), only among ``steps``
    when given (the saved ones); None without such an evaluation. Ties go to the earlier step."""
    key, allowed = metric_key(metric), None if steps is None else set(steps)
    scored = [(entry[key], entry["step"]) for entry in log_history
              if isinstance(entry.get(key), (int, float)) and (allowed is None or entry.get("step") in allowed)]
    if not scored:
        return None
    value, step = min(scored, key=lambda pair: (-pair[0] if greater else pair[0], pair[1]))
    return step, value


def rotate(run_dir: Path, save_total_limit: Optional[int], best: Optional[int], current: Optional[int] = None) -> List[Path]:
    """Delete the oldest complete checkpoints beyond ``save_total_limit``, never the newest, the best
    or the one just saved.

    ``best`` is the step of the best checkpoint (see :func:`best_evaluation`). So with a limit of 1 and a
    best checkpoint older than the newest, two remain. ``current`` is the step just saved: after a
    resume from an older checkpoint (a newer one was damaged) it is not the highest step, and it is
    the one whole checkpoint of the run's present. ``None`` or a limit below 1 deletes nothing
    (transformers' meaning of ``save_total_limit``). Returns the deleted directories.
    """
    if not save_total_limit or save_total_limit < 1:
        return []
    found = complete(run_dir)
    protected = {found[-1]} if found else set()
    protected |= {path for path in found if step_of(path) in (best, current)}
    deletable = [path for path in found if path not in protected]
    excess = len(found) - max(save_total_limit, len(protected))
    doomed = deletable[:max(excess, 0)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def out_of_space(run_dir: Path, error: Exception, step: int) -> UserError:
    """The error for a full disk (or quota) during training: unfinished saves are deleted, to free
    their space, and the message names the newest complete checkpoint, from which a rerun resumes."""
    remove_partials(run_dir)
    found = complete(run_dir)
    if isinstance(error, OSError) and error.strerror:
        reason = f"{error.strerror}: {error.filename or 'while saving'}"
    else:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(
        f"no space left on the device holding {run_dir} at step {step} "
        f"({reason}); the unfinished save was deleted; "
        + (f"newest complete checkpoint: {found[-1]}" if found else "no complete checkpoint was saved"),
        fix=f"free space there (df -h {run_dir}) or lower train.save_total_limit, then rerun the same command "
        "(resume=auto continues from the newest complete checkpoint)",
    )
