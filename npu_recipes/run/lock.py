"""One training run per run directory, enforced by a lock the kernel releases when its holders die.

The launching process takes an exclusive ``flock`` on ``RUN_DIR/.lock`` to check that nobody is
using the directory, then holds it shared for the rest of its life; every torchrun worker holds it
shared too. A later run can take it exclusively only once all of them have exited, however
they exited (``kill -9`` included), so a rerun never writes a directory that a live launcher or an
orphaned worker is still writing, and a stale pid in manifest.json that now belongs to an unrelated
process blocks nothing. A process id alone would be wrong in both ways.

The process that claims the lock writes its pid and host into ``.lock``, so a command refused
because the directory is in use can name the process, even before that run has written its manifest.

``flock`` works within one host and on most network filesystems (NFSv4, Lustre with ``flock``
mounted); where the filesystem refuses locks, a warning is logged and the run goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import platform
from pathlib import Path
from typing import Dict, Optional, Tuple

log = logging.getLogger(__name__)

LOCK = ".lock"
"""The lock file's name in a run directory."""

_held: Dict[Path, int] = {}


def _open(run_dir: Path) -> int:
    return os.open(Path(run_dir) / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _unsupported(error: OSError, run_dir: Path) -> bool:
    if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        log.warning("the filesystem of %s does not support locks (%s): two runs in it would not be stopped", run_dir, error.strerror)
        return True
    return False


def claim(run_dir: Path) -> bool:
    """Check that no other process uses ``run_dir``, then hold its lock (shared) until this process exits.

    Returns:
        True when this process now holds the lock (or already did), False when another process
        holds it: a live launcher or worker of another run in this directory.
    """
    run_dir = Path(run_dir).absolute()
    if run_dir in _held:
        return True
    descriptor = _open(run_dir)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return False
    except OSError as error:
        os.close(descriptor)
        if _unsupported(error, run_dir):
            return True
        raise
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()} {platform.node()}\n".encode())
    # Shared from now on, so that this run's own workers can join (see :func:`join`).
    fcntl.flock(descriptor, fcntl.LOCK_SH)
    _held[run_dir] = descriptor
    return True


def join(run_dir: Path) -> None:
    """Hold ``run_dir``'s lock shared in a worker of the run its launcher claimed, until this process exits."""
    run_dir = Path(run_dir).absolute()
    if run_dir in _held:
        return
    descriptor = _open(run_dir)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if isinstance(error, BlockingIOError) or _unsupported(error, run_dir):
            return
        raise
    _held[run_dir] = descriptor


def release(run_dir: Path) -> None:
    """Give up this process's hold on ``run_dir`` (for a run directory this process deletes or leaves)."""
    descriptor = _held.pop(Path(run_dir).absolute(), None)
    if descriptor is not None:
        os.close(descriptor)


def busy(run_dir: Path) -> bool:
    """True when another process holds ``run_dir``'s lock (a run is using the directory); creates nothing."""
    run_dir = Path(run_dir).absolute()
    if run_dir in _held:
        return False
    try:
        descriptor = os.open(run_dir / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)
    return False


def holder(run_dir: Path) -> Optional[Tuple[int, str]]:
    """``(pid, host)`` of the process that claimed ``run_dir``'s lock, as it wrote them; None when unknown."""
    try:
        pid, host = (Path(run_dir) / LOCK).read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None
