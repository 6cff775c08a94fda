"""One torchrun worker: ``python -m npu_recipes.worker RUN_DIR/resolved.yaml`` (started by :mod:`npu_recipes.launch`).

The worker never composes: it loads the resolved config the launching process wrote and runs the
same stage function a single process runs. Global rank 0 prints to the launching console; every
other rank writes its stdout and stderr to ``RUN_DIR/logs/rank<N>.log``.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path

from npu_recipes import cli, config as config_module, devices, launch, runner, stages
from npu_recipes.errors import Interrupted, UserError, report_and_exit
from npu_recipes.rundir import RunDir


def _redirect_output(path: Path) -> None:
    """Point this process's file descriptors 1 and 2 (so C++ and child output too) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)


def main(argv: list[str] | None = None) -> None:
    """Load ``resolved.yaml`` (the only argument) and run its stage in this rank.

    Exits 2 with one ``npu_recipes: error:`` block on bad input, like the CLI, and 130 without a
    traceback on Ctrl-C.
    """
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1:
        sys.exit("usage: python -m npu_recipes.worker RUN_DIR/resolved.yaml (started by torchrun)")
    resolved = Path(arguments[0])
    run_dir = RunDir(resolved.parent)
    placement = devices.process_placement()
    if placement.rank != 0:
        _redirect_output(launch.rank_log(run_dir.path, placement.rank))
    cli.setup_logging()
    # DeepSpeed calls torch collectives that torch 2.13 deprecated, once per step: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    try:
        config = config_module.load_resolved(resolved)
        runner.run_stage(stages.load(config.stage), config, run_dir, records_failure=placement.rank == 0)
    except UserError as error:
        report_and_exit(error)
    except Interrupted as stop:
        if placement.rank == 0:
            print(f"npu_recipes: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        # Ctrl-C reaches every worker at once; the launcher reports it, once, without a traceback per rank.
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
