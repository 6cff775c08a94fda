"""The one exception type for mistakes a user can fix, and how it reaches the terminal."""

from __future__ import annotations

import sys


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


def report_and_exit(error: UserError) -> None:
    """Print ``error`` as one ``npu_recipes: error:`` block on stderr and exit with status 2."""
    print(f"npu_recipes: error: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


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


class NothingToDo(Exception):
    """The command has nothing left to do (e.g. rerunning a training run that completed); the CLI
    prints the message and exits 0."""
