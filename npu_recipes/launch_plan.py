"""How a run is started: the command the user types, its environment, and torchrun's command line.

``stage=plan`` prints this, and the multi-device launcher builds its ``torch.distributed.run``
command with :func:`torchrun_command`, so what the plan shows is what runs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from npu_recipes import devices
from npu_recipes.schema import DEEPSPEED_PARALLELISMS, ParallelismConfig, RecipeConfig


@dataclass(frozen=True)
class LaunchPlan:
    """The processes of one run.

    Attributes:
        world_size: processes over all nodes (``nproc_per_node * nnodes``).
        environment: variables set for the command (device visibility, DeepSpeed's accelerator).
        command: what the user runs on each node.
        workers: the torchrun command line the runner starts for more than one process, else None.
    """

    world_size: int
    environment: Dict[str, str]
    command: List[str]
    workers: Optional[List[str]]

    def shell(self) -> str:
        """The command with its environment, as one line to paste into a shell."""
        assignments = [f"{key}={shlex.quote(value)}" for key, value in self.environment.items()]
        return " ".join([*assignments, shlex.join(self.command)])


def torchrun_command(parallelism: ParallelismConfig, module_args: Sequence[str], python: str = "python") -> List[str]:
    """``python -m torch.distributed.run`` with the rendezvous settings of ``parallelism``, then ``module_args``.

    ``module_args`` is what each worker runs (e.g. ``["-m", "npu_recipes", ...]``).
    """
    return [
        python, "-m", "torch.distributed.run",
        "--nproc_per_node", str(parallelism.nproc_per_node),
        "--nnodes", str(parallelism.nnodes),
        "--node_rank", str(parallelism.node_rank),
        "--master_addr", parallelism.master_addr,
        "--master_port", str(parallelism.master_port),
        *module_args,
    ]


def environment(device_type: str, parallelism: ParallelismConfig) -> Dict[str, str]:
    """Variables for a run on ``device_type``: the first ``nproc_per_node`` devices made visible
    (``ASCEND_RT_VISIBLE_DEVICES=0,1,2,3`` on NPUs, as the seed writes it), and ``DS_ACCELERATOR``
    for DeepSpeed parallelisms."""
    device = devices.Device(device_type, parallelism.nproc_per_node)
    variables: Dict[str, str] = {}
    if device.visibility_variable:
        variables[device.visibility_variable] = ",".join(str(i) for i in range(parallelism.nproc_per_node))
    if parallelism.name in DEEPSPEED_PARALLELISMS:
        variables["DS_ACCELERATOR"] = device.deepspeed_accelerator
    return variables


def plan(config: RecipeConfig, device_type: str, user_args: Sequence[str], python: str = "python") -> LaunchPlan:
    """The :class:`LaunchPlan` of ``config`` on ``device_type`` (``npu``, ``cuda``, ``cpu``).

    Args:
        user_args: the overrides the user passes (``+recipe=NAME key=value ...``).
        python: the interpreter to name in the commands.
    """
    parallelism = config.parallelism
    world_size = parallelism.nproc_per_node * parallelism.nnodes
    command = [python, "-m", "npu_recipes", *user_args]
    workers = torchrun_command(parallelism, command[1:], python) if world_size > 1 else None
    return LaunchPlan(world_size, environment(device_type, parallelism), command, workers)
