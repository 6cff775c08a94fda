"""The run directory: the one place a training run records everything, read by every later stage.

Layout (the README's run-directory table)::

    resolved.yaml     the fully resolved config: enough to rerun, rebuild the validation split,
                      or find the base model (npu_recipes.config.resolved)
    manifest.json     command, git commit, versions, devices, data fingerprint and counts,
                      start/end time, status, final metrics (npu_recipes.run.manifest, its only writer)
    logging.jsonl     one JSON object per logging or evaluation step
    loss.png          training and evaluation loss against step
    validation_rows.json  the held-out rows' ids and content hash (npu_recipes.run.heldout)
    checkpoint-<N>/   adapter or full weights (safetensors) + trainer state (npu_recipes.run.checkpoints)
    checkpoint-<N>-merged/, checkpoint-<N>/infer_result/   written by the merge and infer stages
    .lock             held by the run's processes (npu_recipes.run.lock)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from npu_recipes import atomic
from npu_recipes.config.resolved import RESOLVED, to_yaml
from npu_recipes.config.schema import RecipeConfig
from npu_recipes.errors import UserError
from npu_recipes.run import checkpoints, lock, manifest, shared_storage
from npu_recipes.runtime.launch import DEEPSPEED_CONFIG, LOGS

log = logging.getLogger(__name__)

LOGGING = "logging.jsonl"
LOSS_PLOT = "loss.png"


class RunDir:
    """A run directory on disk; every write to it is atomic (see :mod:`npu_recipes.atomic`)."""

    def __init__(self, path: Path, created_here: bool = False, created_parents: tuple = ()):
        self.path = Path(path)
        self.created_here = created_here
        self.created_parents = created_parents

    @property
    def manifest_path(self) -> Path:
        return self.path / manifest.MANIFEST

    def read_manifest(self) -> manifest.RunManifest:
        """The run's manifest (:func:`npu_recipes.run.manifest.read`)."""
        return manifest.read(self.path)

    def update_manifest(self, **fields: Any) -> manifest.RunManifest:
        """Set ``fields`` of the run's manifest (:func:`npu_recipes.run.manifest.update`)."""
        return manifest.update(self.path, **fields)

    def append_log(self, record: Dict[str, Any]) -> None:
        """Append one JSON record as a line of logging.jsonl (a single write, flushed at once)."""
        with open(self.path / LOGGING, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(manifest.finite_or_null(record), allow_nan=False) + "\n")

    def read_log(self, skip_damaged: bool = False):
        """All records of logging.jsonl, in order.

        A last line without its newline that is not JSON (an append cut short by a crash or a full
        disk) is left out. With ``skip_damaged``, every line that is not a JSON object is left out
        and ``(records, numbers of the damaged lines)`` is returned.

        Raises:
            UserError: without ``skip_damaged``, a line other than a cut-short last one is not a JSON object.
        """
        log_path = self.path / LOGGING
        if not log_path.is_file():
            return ([], []) if skip_damaged else []
        text = log_path.read_text(errors="replace")
        lines = text.splitlines()
        records, damaged = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif skip_damaged or (number == len(lines) and not text.endswith("\n")):
                damaged.append(number)
            else:
                raise UserError(
                    f"{log_path}, line {number}: not a JSON record: {line[:80]!r}",
                    fix="delete that line (or the file: it is the run's log, not needed to resume)",
                )
        return (records, damaged) if skip_damaged else records

    def checkpoints(self) -> list[Path]:
        """Complete ``checkpoint-<N>`` directories, oldest step first (see :mod:`npu_recipes.run.checkpoints`)."""
        return checkpoints.complete(self.path)

    def discard_if_empty_of_results(self) -> None:
        """Remove what this run wrote when it holds no checkpoint, so a run that failed before saving
        anything leaves nothing that looks like a result. A directory the user made beforehand is
        kept (only this run's files go); one this run created is deleted."""
        if not self.path.is_dir() or self.checkpoints():
            return
        lock.release(self.path)
        if self.created_here:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self.created_parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
            return
        for name in (RESOLVED, manifest.MANIFEST, LOGGING, LOSS_PLOT, DEEPSPEED_CONFIG, lock.LOCK, shared_storage.TOKEN_FILE):
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / LOGS, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return True


def in_use(path: Path) -> UserError:
    """The error for a run directory whose lock another process holds, naming that process: the
    one its ``.lock`` names (written as it claimed the lock), else the one the manifest names."""
    found = lock.holder(path)
    for _ in range(20):
        # The claiming process writes its pid just after locking: give it a moment.
        if found is not None:
            break
        time.sleep(0.05)
        found = lock.holder(path)
    if found is None:
        try:
            recorded = manifest.read(path)
            found = (recorded.pid, recorded.host) if isinstance(recorded.pid, int) else None
        except UserError:
            found = None
    pid, host = found if found is not None else (None, None)
    alive = pid is not None and host == platform.node() and _alive(pid)
    who = f"process {pid} on this host is still training in it" if alive else (
        f"process {pid} on host {host} is still training in it" if pid is not None and host != platform.node() else
        "another process is still training in it (the worker processes of a run whose launcher died "
        "stop at the end of their current step)")
    return UserError(
        f"output_dir {path} is in use: {who}",
        fix=(f"wait for it to finish, stop it (kill {pid}: it saves a checkpoint and exits), or pass another output_dir"
             if alive else "wait for it to finish, or pass another output_dir"),
    )


def claim(path: Path) -> None:
    """Hold ``path``'s run lock for this process (:func:`npu_recipes.run.lock.claim`).

    Raises:
        UserError: another process (a launcher or a worker of a run in ``path``) holds it (:func:`in_use`),
            or the lock file cannot be written.
    """
    try:
        if lock.claim(path):
            return
    except OSError as error:
        raise UserError(f"cannot write into output_dir {path}: {error.strerror}", fix="make it writable, or pass another output_dir") from None
    raise in_use(path)


def _not_empty(path: Path) -> UserError:
    holds_run = (path / RESOLVED).is_file()
    found = checkpoints.complete(path)
    return UserError(
        f"output_dir {path} already exists and is not empty",
        fix="pass a new output_dir=DIR, or delete the old run"
        + (", or pass resume=auto to continue the training run in it" if holds_run
           else f", or pass a new output_dir with resume={found[-1]} to continue from its newest checkpoint" if found else ""),
    )


def _file_above(path: Path) -> Optional[Path]:
    """The first of ``path``'s parent directories that is an existing file (so nothing can be made under it)."""
    return next((parent for parent in reversed(path.parents) if parent.exists() and not parent.is_dir()), None)


def check_creatable(path: Path, fresh_output_dir: bool) -> None:
    """Refuse, before anything is loaded, an ``output_dir`` that :func:`create` could not make: an
    existing file, a path below a file, a directory another run uses or (explicit ``output_dir``)
    one that is not empty, or a place this process may not write (probed with a temporary directory,
    removed at once: :func:`npu_recipes.atomic.check_writable`).

    Raises:
        UserError: as above, naming the path.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir {path} is an existing file, not a directory", fix="pass a directory path as output_dir=DIR")
    blocker = _file_above(path)
    if blocker is not None:
        raise UserError(f"output_dir {path} cannot be created: {blocker} is a file, not a directory",
                        fix=f"pass an output_dir=DIR outside {blocker}, or move that file away")
    if path.is_dir() and not fresh_output_dir:
        if lock.busy(path):
            raise in_use(path)
        if any(path.iterdir()):
            raise _not_empty(path)
    try:
        atomic.check_writable(path)
    except OSError as error:
        raise UserError(f"cannot create output_dir {path}: {error.strerror}", fix="pass a writable output_dir=DIR") from None


def _claim(path: Path, fresh_output_dir: bool) -> "RunDir":
    """Create ``path`` exclusively (``mkdir`` without ``exist_ok``), so two runs never share it."""
    check_creatable(path, fresh_output_dir)
    created_parents = tuple(p for p in path.parents if not p.exists())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output_dir {path}: {error.strerror}", fix="pass a writable output_dir=DIR") from None
    candidate, suffix = path, 2
    while True:
        try:
            candidate.mkdir()
            return RunDir(candidate, created_here=True, created_parents=created_parents)
        except FileExistsError:
            if fresh_output_dir:
                candidate, suffix = path.with_name(f"{path.name}-{suffix}"), suffix + 1
                continue
            # Another run may have created it a moment ago: its lock says so before its files appear.
            if lock.busy(candidate):
                raise in_use(candidate) from None
            if any(candidate.iterdir()):
                raise _not_empty(candidate) from None
            return RunDir(candidate, created_here=False)
        except OSError as error:
            raise UserError(f"cannot create output_dir {candidate}: {error.strerror}", fix="pass a writable output_dir=DIR") from None


_POLL_S = 0.5


def wait_for_node_zero(path: Path, node_rank: int, timeout_s: float) -> None:
    """Wait until node 0 has written ``path/resolved.yaml`` (polling every 0.5 s, at most ``timeout_s`` seconds).

    A directory that holds an earlier run's ``resolved.yaml`` counts as there at once: node 0
    resumes it or refuses, and the workers of this node read resolved.yaml only after every node
    has joined torchrun's rendezvous, which node 0 enters after it has finished writing.

    Raises:
        UserError: ``resolved.yaml`` did not appear in time (names the node, the path and the two likely causes).
    """
    deadline = time.monotonic() + timeout_s
    if not (path / RESOLVED).is_file():
        log.info("node %d: waiting up to %d s for node 0 to create the run directory %s", node_rank, timeout_s, path)
    while not (path / RESOLVED).is_file():
        if time.monotonic() >= deadline:
            raise UserError(
                f"node {node_rank} waited {timeout_s:g} s (parallelism.join_timeout) for node 0 to create the run "
                f"directory {path}, and {path / RESOLVED} did not appear",
                fix="start node 0 (parallelism.node_rank=0) with the same output_dir, on a filesystem every node shares; "
                "or raise parallelism.join_timeout",
            )
        time.sleep(_POLL_S)


def create(config: RecipeConfig, fresh_output_dir: bool) -> Tuple[RunDir, RecipeConfig]:
    """Create the run directory for ``config`` and write resolved.yaml and an initial manifest.

    With ``fresh_output_dir`` (the default ``outputs/<recipe>/<timestamp>``), a ``-2``, ``-3``...
    suffix avoids two runs started in the same second colliding. An explicit ``output_dir`` that
    already holds files is refused. On a node other than node 0 of a multi-node run nothing is
    created: that node waits (:func:`wait_for_node_zero`) for node 0 to write ``resolved.yaml`` into
    the shared directory, then joins it (writing nothing to it), so the nodes may start in any order.

    Returns:
        The run directory, and ``config`` with ``output_dir`` its absolute path (as resolved.yaml holds it).

    Raises:
        UserError: output_dir exists and is not empty, or cannot be created (names the path); node 0
            did not create it within ``parallelism.join_timeout``.
    """
    path = Path(config.output_dir).expanduser().absolute()
    if config.parallelism.node_rank > 0:
        # Node 0 alone creates the directory and owns resolved.yaml and the manifest; this node's workers read them.
        wait_for_node_zero(path, config.parallelism.node_rank, config.parallelism.join_timeout)
        return RunDir(path), dataclasses.replace(config, output_dir=str(path))
    run_dir = _claim(path, fresh_output_dir)
    config = dataclasses.replace(config, output_dir=str(run_dir.path))
    try:
        if not lock.claim(run_dir.path):
            raise in_use(run_dir.path)
        atomic.write_text(run_dir.path / RESOLVED, to_yaml(config))
    except OSError as error:
        run_dir.discard_if_empty_of_results()
        raise UserError(f"cannot write into output_dir {run_dir.path}: {error.strerror}", fix="pass a writable output_dir=DIR") from None
    run_dir.update_manifest(
        recipe=config.recipe,
        stage=config.stage,
        status=manifest.RUNNING,
        command=manifest.command_line(),
        cwd=os.getcwd(),
        git_commit=manifest.git_commit(),
        versions=manifest.package_versions(),
        host=platform.node(),
        pid=os.getpid(),
        started_at=manifest.now(),
    )
    return run_dir, config
