"""Starting several worker processes with torch's own launcher, ``torch.distributed.run`` (torchrun).

The launching process composes once and writes ``resolved.yaml``; :func:`plan_launch` checks everything
that can be checked before a worker exists, and :func:`launch` runs torchrun's launcher in this
process with the argument list of the equivalent command line::

    python -m torch.distributed.run --nproc-per-node N --nnodes 1 --node-rank 0 --master-addr A \\
        [--master-port P] -m npu_recipes.worker RUN_DIR/resolved.yaml

on one node, and on several nodes the same command on every node, with torchrun's c10d rendezvous
(``--rdzv-backend=c10d --rdzv-endpoint=A:P --rdzv-id=<from output_dir>``) instead of a fixed master,
so the nodes may start in any order (see :func:`torchrun_arguments`). Each worker loads
``resolved.yaml`` (workers never compose again). Running the launcher in-process, rather than as a child ``torchrun``, lets the exit status of the worker that failed
first reach the user (torchrun itself exits 1 for every failure), while torchrun's agent still
forwards SIGINT/SIGTERM to every worker and kills what does not stop.

swift's environment variables (``NPROC_PER_NODE``, ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) are read by the multi-process ``parallelism`` options as defaults, so the seed's
command lines keep working; a variable that contradicts the composed config is an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

from npu_recipes import atomic
from npu_recipes.config import schedulers
from npu_recipes.config.resolved import RESOLVED
from npu_recipes.config.schema import ParallelismConfig
from npu_recipes.errors import UserError
from npu_recipes.runtime import deepspeed_config, devices
from npu_recipes.runtime.devices import Device

log = logging.getLogger(__name__)

WORKER_MODULE = "npu_recipes.worker"
DEEPSPEED_CONFIG = "deepspeed.json"
"""The generated DeepSpeed config in the run directory; workers hand its path to the Trainer."""
LAUNCHER_PID = "NPU_RECIPES_LAUNCHER_PID"
"""Environment variable naming the launching process to its workers (see :mod:`npu_recipes.worker`)."""
NODE_RANK_VARIABLE = "NPU_RECIPES_NODE_RANK"
"""Environment variable naming this node's ``parallelism.node_rank`` to its workers (see :mod:`npu_recipes.run.shared_storage`)."""
LOGS = "logs"
"""Run-directory folder where every rank but 0 writes its output, as ``rank<N>.log``."""

ENVIRONMENT_SETTINGS: Dict[str, str] = {variable: key for key, variable in schedulers.SWIFT.items()}
"""swift's launch variables and the ``parallelism.*`` keys they mean."""

_SINGLE_PROCESS_SETTINGS = ("NPROC_PER_NODE", "NNODES")

_LOWEST = {"NPROC_PER_NODE": 1, "NNODES": 1, "NODE_RANK": 0, "MASTER_PORT": 1}
"""The smallest value of each whole-number launch variable."""


def rank_log(run_dir: Path, rank: int) -> Path:
    """Where global rank ``rank`` (> 0) writes its stdout and stderr."""
    return Path(run_dir) / LOGS / f"rank{rank}.log"


@dataclass(frozen=True)
class LaunchPlan:
    """How a run will execute, decided before any worker starts.

    Attributes:
        device: the resolved device (type and visible count on this node).
        world_size: processes over all nodes (``nproc_per_node * nnodes``).
        in_process: True for one process without DeepSpeed: the stage runs in the launching process.
        torchrun_args: torchrun's arguments, without the worker module and its argument (empty when ``in_process``).
    """

    device: Device
    world_size: int
    in_process: bool
    torchrun_args: List[str]

    def command(self, resolved_yaml: Path) -> List[str]:
        """The equivalent shell command: ``python -m torch.distributed.run ... -m npu_recipes.worker resolved.yaml``.

        ``--log-dir`` is the null device: workers write their own logs into the run directory, and
        torchrun would otherwise leave an empty ``torchelastic_*`` folder in the temporary directory per run.
        """
        return [
            sys.executable, "-m", "torch.distributed.run", *self.torchrun_args, f"--log-dir={os.devnull}",
            "-m", WORKER_MODULE, str(resolved_yaml),
        ]


def check_environment(parallelism: ParallelismConfig, recipe: str) -> None:
    """Fail when one of swift's launch variables contradicts the composed ``parallelism`` (of recipe ``recipe``).

    With ``parallelism=single`` only ``NPROC_PER_NODE`` and ``NNODES`` are compared (an unrelated
    ``MASTER_PORT`` in the shell does not matter to one process).

    Raises:
        UserError: names the variable, both values and the two ways out.
    """
    parallel = parallelism
    names = _SINGLE_PROCESS_SETTINGS if runs_in_process(parallelism) else tuple(ENVIRONMENT_SETTINGS)
    for variable in names:
        if not os.environ.get(variable, "").strip():  # unset, or set to nothing as `VAR= command` does
            continue
        key = ENVIRONMENT_SETTINGS[variable]
        configured = getattr(parallel, key)
        lowest = _LOWEST.get(variable)
        if lowest is not None and not (os.environ[variable].strip().isdigit() and int(os.environ[variable]) >= lowest):
            raise UserError(f"{variable}={os.environ[variable]!r} is not a whole number >= {lowest}",
                            fix=f"set {variable} to a whole number such as {max(lowest, 1)}, or unset it")
        if os.environ[variable].strip() != str(configured):
            raise UserError(
                f"{variable}={os.environ[variable]} contradicts parallelism.{key}={configured} "
                f"(parallelism={parallel.name}{', recipe ' + recipe if recipe != 'adhoc' else ''})",
                fix=f"pass parallelism.{key}={os.environ[variable]} (or a multi-process parallelism such as "
                f"parallelism=ddp) to follow the variable, or unset {variable}",
            )


def runs_in_process(parallelism: ParallelismConfig) -> bool:
    """True for one process without DeepSpeed: the stage runs in the launching process, no torchrun."""
    return parallelism.world_size == 1 and not deepspeed_config.uses_deepspeed(parallelism)


def rendezvous_id(output_dir: str) -> str:
    """The c10d rendezvous id of the run writing ``output_dir``: the same on every node that names the
    same directory, different for another run that happens to use the same master address and port."""
    path = str(Path(output_dir).expanduser().absolute())
    return "npu-recipes-" + hashlib.sha256(path.encode()).hexdigest()[:16]


def torchrun_arguments(parallelism: ParallelismConfig, output_dir: str) -> List[str]:
    """torchrun's arguments for ``parallelism``, for the run writing ``output_dir``.

    One node: a static rendezvous on this node; ``--master-port`` is left out when
    ``parallelism.master_port`` is null, so torchrun rendezvouses on a free port of its own choosing.
    Several nodes: torchrun's c10d rendezvous hosted at ``master_addr:master_port`` by whichever
    node gets there first, with an id from ``output_dir`` (:func:`rendezvous_id`) and
    ``join_timeout``; the arguments are the same on every node, the nodes may start in any order,
    and the rendezvous, not ``node_rank``, numbers the nodes (global rank 0 may be on any node).
    ``--shutdown-timeout`` is passed where torchrun has it (older torch versions give workers a
    fixed 30 s after SIGTERM).
    """
    parallel = parallelism
    arguments = [f"--nproc-per-node={parallel.nproc_per_node}", f"--nnodes={parallel.nnodes}"]
    if parallel.nnodes > 1:
        arguments += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={_endpoint(parallel.master_addr, parallel.master_port)}",
            f"--rdzv-id={rendezvous_id(output_dir)}",
            f"--rdzv-conf=join_timeout={parallel.join_timeout}",
        ]
    else:
        arguments += [f"--node-rank={parallel.node_rank}", f"--master-addr={parallel.master_addr}"]
        if parallel.master_port is not None:
            arguments.append(f"--master-port={parallel.master_port}")
    if _torchrun_has_option("--shutdown-timeout"):
        arguments.append(f"--shutdown-timeout={parallel.shutdown_timeout}")
    return arguments


def _endpoint(address: str, port: int | None) -> str:
    # An IPv6 address is bracketed, as torchrun's endpoint parser expects.
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _torchrun_has_option(option: str) -> bool:
    from torch.distributed import run as torchrun

    return option in torchrun.get_args_parser().format_help()


def plan_launch(parallelism: ParallelismConfig, device: str, recipe: str, output_dir: str) -> LaunchPlan:
    """Check the launch of ``parallelism`` on ``device`` (``device=...``) against the environment and
    the devices, before any worker or run directory exists (``output_dir`` names the rendezvous).

    Raises:
        UserError: a launch variable contradicts the config; DeepSpeed is asked for but not
            installed; ``nproc_per_node`` exceeds the visible devices (names both numbers and the
            visibility variable); the device's runtime is missing (e.g. ``device=npu`` without
            torch_npu: what to install or source).
    """
    check_environment(parallelism, recipe)
    parallel = parallelism
    if deepspeed_config.uses_deepspeed(parallel) and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"parallelism={parallel.name} uses DeepSpeed, which is not installed in {sys.executable}",
            fix="pip install deepspeed (or npu_recipes[deepspeed]), or choose parallelism=ddp",
        )
    in_process = runs_in_process(parallel)
    return LaunchPlan(
        device=devices.resolve_for_processes(device, parallel.nproc_per_node),
        world_size=parallel.world_size,
        in_process=in_process,
        # Asking torchrun which options it has imports torch: not for a run that never starts it.
        torchrun_args=[] if in_process else torchrun_arguments(parallel, output_dir),
    )


class WorkersFailed(Exception):
    """A worker exited non-zero, or the launcher was stopped by a signal.

    Attributes:
        exit_code: the status to exit with (the failed worker's, or 128 + signal number).
        rank: global rank of the first worker that failed (None when a signal stopped the run).
        reported: True when the failure was already printed on this console (by rank 0).
    """

    def __init__(self, message: str, exit_code: int, rank: int | None, reported: bool):
        super().__init__(message)
        self.exit_code = exit_code
        self.rank = rank
        self.reported = reported


def _tail(path: Path, lines: int = 20) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _failure(error, run_dir: Path, world_size: int) -> WorkersFailed:
    """Turn torchrun's ChildFailedError into the status of the worker that failed first.

    Rank 0 prints on this console, so its own failure (a user error or a traceback) is already
    visible; for any other rank the message names its log file and shows that log's last lines.
    """
    failures = error.failures
    rank_zero = failures.get(0)
    if rank_zero is not None and rank_zero.exitcode > 0:
        rank, failure = 0, rank_zero
    else:
        rank, failure = error.get_first_failure()
    exit_code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    how = f"exited with status {failure.exitcode}" if failure.exitcode > 0 else f"was killed by signal {-failure.exitcode}"
    if rank == 0:
        # A rank-0 exit status was printed by rank 0 itself; a signal that killed it printed nothing.
        return WorkersFailed(f"worker rank 0 of {world_size} {how}", exit_code, 0, reported=failure.exitcode > 0)
    log_path = rank_log(run_dir, rank)
    tail = _tail(log_path)
    return WorkersFailed(
        f"worker rank {rank} of {world_size} {how}; its output is in {log_path}" + (f"; last lines:\n{tail}" if tail else ""),
        exit_code,
        rank,
        reported=False,
    )


EXIT_RENDEZVOUS = 1
"""Exit status when the nodes never met: not bad input on this node (2), the job as a whole did not form."""


def _rendezvous_failure(error: Exception, parallelism: ParallelismConfig) -> WorkersFailed:
    """torchrun's rendezvous did not complete: a node never arrived, or node 0's endpoint was unreachable."""
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    parallel = parallelism
    endpoint = _endpoint(parallel.master_addr, parallel.master_port)
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, RendezvousTimeoutError):
        what = (f"the {parallel.nnodes} nodes did not all join the rendezvous at {endpoint} within "
                f"parallelism.join_timeout={parallel.join_timeout} s")
        fix = ("start every node with the same output_dir, parallelism.master_addr and parallelism.master_port "
               "(an address of one node that every node reaches: stage=doctor checks it), or raise parallelism.join_timeout")
    else:
        # The node hosting the rendezvous store stopped (its workers failed: its own output says why) or is unreachable.
        what = f"lost the rendezvous at {endpoint}: the node hosting it stopped or cannot be reached"
        fix = ("read the other nodes' output for why they stopped; if none did, check that every node reaches "
               f"{endpoint} (stage=doctor checks it) and start them all again")
    return WorkersFailed(f"node {parallel.node_rank}: {what} ({type(error).__name__}: {cause})\n  fix: {fix}",
                         EXIT_RENDEZVOUS, None, reported=False)


def launch(parallelism: ParallelismConfig, plan: LaunchPlan, run_dir: Path) -> None:
    """Start ``plan.world_size`` workers on this node through torchrun and wait for all of them.

    Writes the generated DeepSpeed config into ``run_dir`` first (when ``parallelism`` uses
    DeepSpeed), and exports the device's worker environment (``DS_ACCELERATOR``).

    Raises:
        WorkersFailed: a worker failed (its exit status, rank and log), SIGINT/SIGTERM stopped
            the run after torchrun forwarded the signal to every worker, or the nodes of a
            multi-node run did not all join torchrun's rendezvous within ``join_timeout``.
    """
    from torch.distributed import DistError
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    (run_dir / LOGS).mkdir(exist_ok=True)
    if deepspeed_config.uses_deepspeed(parallelism):
        atomic.write_json(run_dir / DEEPSPEED_CONFIG, deepspeed_config.build(parallelism, plan.device))
    command = plan.command(run_dir / RESOLVED)
    os.environ.update(plan.device.worker_environment())
    os.environ[LAUNCHER_PID] = str(os.getpid())
    # The rendezvous numbers the nodes its own way; workers learn this node's node_rank from here.
    os.environ[NODE_RANK_VARIABLE] = str(parallelism.node_rank)
    # Its warnings and errors when a node is lost carry C++ stack frames; the failure is summarised in one message instead.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    count = parallelism.nproc_per_node
    log.info("launching %d worker process%s: %s", count, "" if count == 1 else "es", shlex.join(command))
    try:
        torchrun.run(torchrun.parse_args(command[3:]))
    except ChildFailedError as error:
        raise _failure(error, run_dir, plan.world_size) from None
    except (RendezvousError, DistError) as error:
        # DistError: the agent's store calls failed (the node hosting the rendezvous store is gone).
        raise _rendezvous_failure(error, parallelism) from None
    except SignalException as error:
        name = signal.Signals(error.sigval).name
        raise WorkersFailed(f"stopped by {name}; every worker was sent {name}", 128 + int(error.sigval), None, reported=False) from None
