"""One torchrun worker: ``python -m npu_recipes.worker RUN_DIR/resolved.yaml`` (started by :mod:`npu_recipes.runtime.launch`).

The worker never composes: it loads the resolved config the launching process wrote and runs the
same stage function a single process runs. Global rank 0 prints to the launching console; every
other rank writes its stdout and stderr to ``RUN_DIR/logs/rank<N>.log``.

A worker never outlives its launcher: when the launcher dies (even by ``kill -9``, which it cannot
forward), the kernel sends the worker SIGTERM, so it saves at the end of its step and exits as
after any SIGTERM, instead of training on unseen in a directory a rerun would then also write.
Workers also hold the run directory's lock (:mod:`npu_recipes.run.lock`) until they exit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import warnings
from pathlib import Path

from npu_recipes import cli, errors, runner
from npu_recipes.config.resolved import load_resolved
from npu_recipes.errors import Interrupted, UserError
from npu_recipes.run import lock
from npu_recipes.run.rundir import RunDir
from npu_recipes.runtime import devices, launch


def _redirect_output(path: Path) -> None:
    """Point this process's file descriptors 1 and 2 (so C++ and child output too) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)


_PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when its parent dies (Linux)."""


def _stop_with_launcher() -> None:
    launcher = os.environ.get(launch.LAUNCHER_PID)
    if not sys.platform.startswith("linux") or not launcher:
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(launcher):
        # The launcher died before prctl took effect.
        os.kill(os.getpid(), signal.SIGTERM)


def _leave_process_group() -> None:
    """Wait for every rank, then close the process group, as the last step of a rank whose stage ended well.

    Without it a rank that had finished while rank 0 still wrote the final checkpoint exited with the
    group open, and tearing down gloo's threads under DeepSpeed aborted it ("terminate called without an
    active exception"): torchrun then stopped rank 0 mid-save (2 ZeRO runs in about 6 runs of the suite).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Load ``resolved.yaml`` (the only argument) and run its stage in this rank.

    Exits 2 with one ``npu_recipes: error:`` block on bad input, like the CLI, and 130 without a
    traceback on Ctrl-C.
    """
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1:
        sys.exit("usage: python -m npu_recipes.worker RUN_DIR/resolved.yaml (started by torchrun)")
    _stop_with_launcher()
    resolved = Path(arguments[0])
    run_dir = RunDir(resolved.parent)
    placement = devices.process_placement()
    if placement.rank != 0:
        _redirect_output(launch.rank_log(run_dir.path, placement.rank))
    cli.setup_logging()
    # DeepSpeed calls torch collectives that torch 2.13 deprecated, once per step: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        config = load_resolved(resolved)
        lock.join(run_dir.path)
        runner.run_worker(config, run_dir, placement.rank)
        _leave_process_group()
    except (UserError, errors.LostPeer, Interrupted, KeyboardInterrupt, errors.Terminated, OSError) as error:
        # Every rank reports its own bad input (ranks but 0 into their log); rank 0 says where an
        # interrupted run saved; a signal is reported once, by the launcher.
        errors.exit_with(error, announce=isinstance(error, (UserError, errors.LostPeer, OSError)) or (placement.rank == 0 and isinstance(error, Interrupted)))


if __name__ == "__main__":
    main()
