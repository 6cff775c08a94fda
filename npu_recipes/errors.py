"""The exceptions that end a command, and the one table that turns each into an exit status and a message.

A leaf module: it imports nothing of the package, and every other module may import it.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import NamedTuple, NoReturn, Optional


class UserError(Exception):
    """A problem with the user's input (config, data, paths, environment) that the user can fix.

    Args:
        message: what is wrong, naming the thing at fault (key, file and line, row and column).
        fix: one sentence saying what to do about it; printed on its own line.

    The runner prints ``message`` and ``fix`` without a traceback and exits with status 2.
    """

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


class RunStopped(UserError):
    """A run that stopped itself for a reason the user can fix, after recording results worth keeping.

    The runner marks the manifest ``failed`` as for any UserError, but keeps the run directory even
    without a checkpoint, because its logging.jsonl shows what went wrong (e.g. the NaN guard's
    skipped steps).
    """


EXIT_USER_ERROR = 2

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""errno values of a write that failed for lack of room: no space left, quota exceeded, file too large."""


class Interrupted(Exception):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint at the step it had reached.

    Attributes:
        signal_number: the signal that asked for the stop.
        checkpoint: the checkpoint saved at the stop (None when nothing could be saved).
        exit_code: ``128 + signal_number``, the shell's convention (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, message: str, signal_number: int, checkpoint: str | None):
        super().__init__(message)
        self.signal_number = signal_number
        self.checkpoint = checkpoint
        self.exit_code = 128 + signal_number


EXIT_LOST_PEER = 1


class LostPeer(Exception):
    """A worker lost its connection to another rank of a multi-node job (that node or its network
    failed): one message naming the nodes and what to do, exit status 1, no traceback.

    Args:
        message: what happened, with the communication library's own line.
        fix: what to do about it; printed on its own line.
    """

    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message, self.fix = message, fix

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.fix}"


class NothingToDo(Exception):
    """The command has nothing left to do (e.g. rerunning a training run that completed); the CLI
    prints the message and exits 0."""


class Terminated(BaseException):
    """SIGTERM arrived outside training (while loading, tokenizing or finishing; during training it
    saves a checkpoint first, see :mod:`npu_recipes.run.stopping`). Raised from the signal handler the
    way Python raises ``KeyboardInterrupt`` for SIGINT, so the run directory records why the
    process ended instead of saying ``running``; the process exits ``exit_code`` (143)."""

    exit_code = 128 + signal.SIGTERM


def raise_terminated(number, frame) -> None:
    """SIGTERM handler that raises :class:`Terminated` (install with ``signal.signal``)."""
    raise Terminated()


class Exit(NamedTuple):
    """How a command ends: its exit ``status`` and the line it prints on stderr (None: nothing)."""

    status: int
    message: Optional[str]


def exit_for(error: BaseException) -> Optional[Exit]:
    """The one table from an exception that ends a command to its :class:`Exit`; None for a bug,
    which keeps its traceback.

    ============================  ======  =====================================================
    exception                     status  printed
    ============================  ======  =====================================================
    :class:`UserError`            2       ``npu_recipes: error: MESSAGE`` and its ``fix:`` line
    ``OSError`` for a full disk   2       the same, naming the file and where to free space
    :class:`LostPeer`             1       ``npu_recipes: error: MESSAGE`` and its ``fix:`` line
    :class:`Interrupted`          128+N   where the run stopped and saved
    :class:`NothingToDo`          0       why there is nothing to do
    ``BrokenPipeError``           141     nothing: stdout was closed (``npu-recipes ls | head``)
    ``KeyboardInterrupt``         130     ``npu_recipes: interrupted``
    :class:`Terminated`           143     ``npu_recipes: terminated (SIGTERM)``
    ============================  ======  =====================================================
    """
    if isinstance(error, BrokenPipeError):
        # The reader of stdout stopped reading; end as a program that SIGPIPE killed would, silently.
        return Exit(128 + signal.SIGPIPE, None)
    if isinstance(error, OSError) and error.errno in OUT_OF_SPACE:
        # Outside training (which names its checkpoint): building the demo data or a tiny model,
        # tokenizing into HF datasets' cache, writing run records.
        error = UserError(
            f"no space left on the device while writing {error.filename or 'a file'} ({error.strerror})",
            fix="free space there (df -h), or move the cache (NPU_RECIPES_CACHE, HF_DATASETS_CACHE) or output_dir to a larger disk",
        )
    if isinstance(error, UserError):
        return Exit(EXIT_USER_ERROR, f"npu_recipes: error: {error}")
    if isinstance(error, LostPeer):
        return Exit(EXIT_LOST_PEER, f"npu_recipes: error: {error}")
    if isinstance(error, Interrupted):
        return Exit(error.exit_code, f"npu_recipes: {error}")
    if isinstance(error, NothingToDo):
        return Exit(0, f"npu_recipes: {error}")
    if isinstance(error, KeyboardInterrupt):
        return Exit(128 + signal.SIGINT, "npu_recipes: interrupted")
    if isinstance(error, Terminated):
        return Exit(error.exit_code, "npu_recipes: terminated (SIGTERM)")
    return None


def end_progress_bars() -> None:
    """Close the tqdm progress bars still open in this process (the Trainer's, when an error ends
    training), so that a message printed next starts on a line of its own instead of after a bar."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def print_block(message: str) -> None:
    """Print ``message`` (an ``npu_recipes: ...`` block) on stderr, on lines of its own."""
    end_progress_bars()
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


def exit_with(error: BaseException, announce: bool = True) -> NoReturn:
    """End the process as :func:`exit_for` says (printing its line unless ``announce`` is False, for
    a torchrun worker whose launcher reports); re-raise ``error`` when it is a bug."""
    ending = exit_for(error)
    if ending is None:
        raise error
    if isinstance(error, BrokenPipeError):
        # Python flushes stdout once more at exit, which would fail again and print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if announce and ending.message:
        print_block(ending.message)
    sys.exit(ending.status)

