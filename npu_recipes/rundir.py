"""The run directory: the one place a training run records everything, read by every later stage.

Layout (see docs/run-directory.md)::

    resolved.yaml     the fully resolved config: enough to rerun, rebuild the validation split,
                      or find the base model
    manifest.json     command, git commit, versions, devices, data fingerprint and counts,
                      start/end time, status (running | completed | failed), final metrics
    logging.jsonl     one JSON object per logging or evaluation step
    loss.png          training and evaluation loss against step
    validation_rows.json  the held-out rows' ids and content hash (see npu_recipes.heldout)
    checkpoint-<N>/   adapter or full weights (safetensors) + trainer state
    checkpoint-<N>-merged/, checkpoint-<N>/infer_result/   written by the merge and infer stages
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict

from npu_recipes import atomic, checkpoints, config as config_module
from npu_recipes.errors import UserError
from npu_recipes.schema import RecipeConfig

RESOLVED = "resolved.yaml"
MANIFEST = "manifest.json"
LOGGING = "logging.jsonl"
LOSS_PLOT = "loss.png"

_VERSIONED_PACKAGES = ("npu_recipes", "torch", "torch_npu", "transformers", "peft", "accelerate", "deepspeed", "datasets", "tokenizers")


def now() -> str:
    """The current local time, ISO 8601 with offset, to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def package_versions() -> Dict[str, str | None]:
    """Installed versions of the packages a run depends on (None when not installed)."""
    versions: Dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the git checkout npu_recipes runs from, or None outside a checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None, so records stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def command_line() -> str:
    """The command that started this process, as a user would retype it (``python -m npu_recipes ...``)."""
    return shlex.join([Path(sys.executable).name, "-m", "npu_recipes", *sys.argv[1:]])


class RunDir:
    """A run directory on disk; every write to it is atomic (see :mod:`npu_recipes.atomic`)."""

    def __init__(self, path: Path, created_here: bool = False, created_parents: tuple = ()):
        self.path = Path(path)
        self.created_here = created_here
        self.created_parents = created_parents

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> Dict[str, Any]:
        """The manifest as a dict ({} when there is none yet)."""
        if not self.manifest_path.is_file():
            return {}
        return json.loads(self.manifest_path.read_text())

    def update_manifest(self, **fields: Any) -> None:
        """Merge ``fields`` into manifest.json (top-level keys replaced) and rewrite it atomically."""
        manifest = self.read_manifest()
        manifest.update(finite_or_null(fields))
        atomic.write_json(self.manifest_path, manifest)

    def append_log(self, record: Dict[str, Any]) -> None:
        """Append one JSON record as a line of logging.jsonl (a single write, flushed at once)."""
        with open(self.path / LOGGING, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")

    def read_log(self) -> list[Dict[str, Any]]:
        """All records of logging.jsonl, in order."""
        log_path = self.path / LOGGING
        if not log_path.is_file():
            return []
        return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]

    def checkpoints(self) -> list[Path]:
        """Complete ``checkpoint-<N>`` directories, oldest step first (see :mod:`npu_recipes.checkpoints`)."""
        return checkpoints.complete(self.path)

    def discard_if_empty_of_results(self) -> None:
        """Remove what this run wrote when it holds no checkpoint, so a run that failed before saving
        anything leaves nothing that looks like a result. A directory the user made beforehand is
        kept (only this run's files go); one this run created is deleted."""
        if not self.path.is_dir() or self.checkpoints():
            return
        if self.created_here:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self.created_parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
            return
        for name in (RESOLVED, MANIFEST, LOGGING, LOSS_PLOT):
            (self.path / name).unlink(missing_ok=True)


def _claim(path: Path, fresh_output_dir: bool) -> "RunDir":
    """Create ``path`` exclusively (``mkdir`` without ``exist_ok``), so two runs never share it."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir {path} is an existing file, not a directory", fix="pass a directory path as output_dir=DIR")
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
            if any(candidate.iterdir()):
                holds_run = (candidate / RESOLVED).is_file()
                raise UserError(
                    f"output_dir {candidate} already exists and is not empty",
                    fix="pass a new output_dir=DIR, or delete the old run"
                    + (", or pass resume=auto to continue the training run in it" if holds_run else ""),
                ) from None
            return RunDir(candidate, created_here=False)
        except OSError as error:
            raise UserError(f"cannot create output_dir {candidate}: {error.strerror}", fix="pass a writable output_dir=DIR") from None


def create(config: RecipeConfig, fresh_output_dir: bool) -> RunDir:
    """Create the run directory for ``config`` and write resolved.yaml and an initial manifest.

    With ``fresh_output_dir`` (the default ``outputs/<recipe>/<timestamp>``), a ``-2``, ``-3``...
    suffix avoids two runs started in the same second colliding. An explicit ``output_dir`` that
    already holds files is refused, except on a node other than node 0 of a multi-node run, which
    joins the directory node 0 created on a shared filesystem (writing nothing to it).

    Raises:
        UserError: output_dir exists and is not empty, or cannot be created (names the path).
    """
    path = Path(config.output_dir).expanduser().absolute()
    if config.parallelism.node_rank > 0 and (path / RESOLVED).is_file():
        # Another node of a multi-node run on a shared filesystem: node 0 created the directory and
        # owns resolved.yaml and the manifest; this node's workers read them.
        config.output_dir = str(path)
        return RunDir(path)
    run_dir = _claim(path, fresh_output_dir)
    config.output_dir = str(run_dir.path)
    try:
        atomic.write_text(run_dir.path / RESOLVED, config_module.to_yaml(config))
    except OSError as error:
        run_dir.discard_if_empty_of_results()
        raise UserError(f"cannot write into output_dir {run_dir.path}: {error.strerror}", fix="pass a writable output_dir=DIR") from None
    run_dir.update_manifest(
        recipe=config.recipe,
        stage=config.stage,
        status="running",
        command=command_line(),
        cwd=os.getcwd(),
        git_commit=git_commit(),
        versions=package_versions(),
        host=platform.node(),
        pid=os.getpid(),
        started_at=now(),
    )
    return run_dir
