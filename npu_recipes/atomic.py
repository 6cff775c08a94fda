"""Write files so that a reader never sees half of one: write a temporary sibling, then rename (a leaf module: imports nothing of the package)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (``os.replace`` of a fully written, fsynced sibling)."""
    path = Path(path)
    temporary = _temporary_sibling(path)
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        # A write that failed (e.g. a full disk) leaves nothing behind.
        temporary.unlink(missing_ok=True)


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` fill a temporary sibling of ``path`` (same suffix), then rename it to ``path``."""
    path = Path(path)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        writer(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def publish_directory(build: Callable[[Path], None], target: Path, replace: bool = False) -> bool:
    """Build a directory under a temporary name beside ``target`` and rename it into place.

    Returns False (and discards the new build) when another process published ``target`` first,
    so concurrent builders of the same cached artefact are safe. With ``replace=True`` an existing
    ``target`` is moved aside only once the new build is complete, then deleted: readers see the
    old directory or the new one, never a partial one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.building-{os.getpid()}")
    retired = target.with_name(f".{target.name}.replaced-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        build(staging)
        if replace and target.exists():
            os.rename(target, retired)
        try:
            os.rename(staging, target)
        except OSError:
            if retired.exists() and not target.exists():
                os.rename(retired, target)
            if target.is_dir():
                return False
            raise
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def check_writable(directory: Path) -> None:
    """Raise ``OSError`` (its ``filename`` the directory at fault) unless files can be created in
    ``directory``, or, while it does not exist yet, in its nearest existing ancestor (where it
    would be created).

    Probes by creating and removing a temporary directory there, which also catches read-only
    mounts and what root may not write (``os.access`` says yes to root whatever the mount).
    """
    existing = Path(directory).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    try:
        probe = tempfile.mkdtemp(prefix=".write-probe-", dir=existing)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(existing)) from None
    os.rmdir(probe)
