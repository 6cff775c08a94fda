"""The run directory: the one place a training run records everything, read by every later stage.

Layout (see docs/run-directory.md)::

    resolved.yaml     the fully resolved config: enough to rerun, rebuild the validation split,
                      or find the base model
    manifest.json     command, git commit, versions, devices, data fingerprint and counts,
                      start/end time, status (running | completed | failed), final metrics
    logging.jsonl     one JSON object per logging or evaluation step
    loss.png          training and evaluation loss against step
    checkpoint-<N>/   adapter or full weights (safetensors) + trainer state
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict

from npu_recipes import atomic, config as config_module
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


class RunDir:
    """A run directory on disk; every write to it is atomic (see :mod:`npu_recipes.atomic`)."""

    def __init__(self, path: Path):
        self.path = Path(path)

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
        manifest.update(fields)
        atomic.write_json(self.manifest_path, manifest)

    def append_log(self, record: Dict[str, Any]) -> None:
        """Append one JSON record as a line of logging.jsonl (a single write, flushed at once)."""
        with open(self.path / LOGGING, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read_log(self) -> list[Dict[str, Any]]:
        """All records of logging.jsonl, in order."""
        log_path = self.path / LOGGING
        if not log_path.is_file():
            return []
        return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]

    def checkpoints(self) -> list[Path]:
        """Complete ``checkpoint-<N>`` directories, by step."""
        found = [p for p in self.path.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def discard_if_empty_of_results(self) -> None:
        """Delete the directory when it holds no checkpoint: a run that failed before saving anything
        leaves nothing that looks like a result."""
        if self.path.is_dir() and not self.checkpoints():
            shutil.rmtree(self.path, ignore_errors=True)


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
    if fresh_output_dir:
        base, suffix = path, 2
        while path.exists():
            path, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
    elif path.exists() and any(path.iterdir()):
        raise UserError(
            f"output_dir {path} already exists and is not empty",
            fix="pass a new output_dir=DIR, or delete the old run",
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output_dir {path}: {error.strerror}", fix="pass a writable output_dir=DIR") from None
    config.output_dir = str(path)
    run_dir = RunDir(path)
    atomic.write_text(path / RESOLVED, config_module.to_yaml(config))
    run_dir.update_manifest(
        recipe=config.recipe,
        stage=config.stage,
        status="running",
        command=shlex.join([Path(sys.executable).name, "-m", "npu_recipes", *sys.argv[1:]]),
        cwd=os.getcwd(),
        git_commit=git_commit(),
        versions=package_versions(),
        host=platform.node(),
        started_at=now(),
    )
    return run_dir
