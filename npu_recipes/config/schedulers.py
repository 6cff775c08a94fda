"""Launch settings from the environment a scheduler gives each node: swift's variables, the Kubernetes
training operator's (PyTorchJob) and Slurm's, so the same command line runs on every node under any of them.

The multi-process ``parallelism`` options (conf/parallelism/ddp.yaml) read their torchrun settings
through the ``${launch_env:KEY,DEFAULT}`` resolver, which asks :func:`setting`. For each key the
first variable that is set wins, in this order:

================  ================  ====================  ====================================  ==================
key               swift             PyTorchJob (elastic)  Slurm                                 PyTorchJob
================  ================  ====================  ====================================  ==================
nproc_per_node    NPROC_PER_NODE    PET_NPROC_PER_NODE
nnodes            NNODES            PET_NNODES            SLURM_NNODES                          WORLD_SIZE (pods)
node_rank         NODE_RANK         PET_NODE_RANK         SLURM_NODEID                          RANK (pod index)
master_addr       MASTER_ADDR       PET_MASTER_ADDR       first host of SLURM_JOB_NODELIST
master_port       MASTER_PORT       PET_MASTER_PORT       15000 + SLURM_JOB_ID mod 20000
================  ================  ====================  ====================================  ==================

The operator's ``WORLD_SIZE``/``RANK`` count pods, one launcher per pod; they are read only outside
a torchrun worker (no ``LOCAL_RANK``), where torchrun's own variables of those names count processes.
Slurm's node list is expanded by ``scontrol show hostnames``, Slurm's own parser of its
``node[01-04]`` syntax; the port is derived from the job id, so every node of a job computes the same one.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from npu_recipes.errors import UserError

SWIFT: Dict[str, str] = {
    "nproc_per_node": "NPROC_PER_NODE",
    "nnodes": "NNODES",
    "node_rank": "NODE_RANK",
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
}
"""swift's launch variables (also what the operator sets as MASTER_ADDR/MASTER_PORT) and the keys they set."""

ELASTIC: Dict[str, str] = {key: f"PET_{name}" for key, name in SWIFT.items()}
"""The training operator's variables for torchrun (``PET_`` + torchrun's option name), set when a PyTorchJob has ``nprocPerNode``."""

SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000
"""Slurm gives no port: ``15000 + SLURM_JOB_ID mod 20000`` (below Linux's ephemeral range 32768-60999)."""

Runner = Callable[[Sequence[str]], str]


def _scontrol_hostnames(nodelist: str) -> str:
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise UserError(
            f"SLURM_JOB_NODELIST={nodelist} is set but scontrol is not on PATH to expand it",
            fix="run inside the Slurm job (srun), or export MASTER_ADDR=<first node's address>",
        )
    result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise UserError(
            f"scontrol show hostnames {nodelist} failed: {result.stderr.strip() or result.returncode}",
            fix="export MASTER_ADDR=<first node's address>",
        )
    return result.stdout


def first_host(nodelist: str, hostnames: Runner = _scontrol_hostnames) -> str:
    """The first host of a Slurm node list (``node[01-02],gpu7`` -> ``node01``), expanded by ``hostnames``
    (``scontrol show hostnames``: one name a line).

    Raises:
        UserError: scontrol is missing or failed, or the list expands to nothing.
    """
    names = hostnames(nodelist).split()
    if not names:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist} names no host", fix="export MASTER_ADDR=<first node's address>")
    return names[0]


def _slurm(key: str, environ: Mapping[str, str], hostnames: Runner) -> Optional[Tuple[str, str]]:
    if key == "nnodes" and "SLURM_NNODES" in environ:
        return environ["SLURM_NNODES"], "SLURM_NNODES"
    if key == "node_rank" and "SLURM_NODEID" in environ:
        return environ["SLURM_NODEID"], "SLURM_NODEID"
    if key == "master_addr" and "SLURM_JOB_NODELIST" in environ:
        return first_host(environ["SLURM_JOB_NODELIST"], hostnames), "SLURM_JOB_NODELIST"
    if key == "master_port" and environ.get("SLURM_JOB_ID", "").isdigit() and "SLURM_NNODES" in environ:
        return str(SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"]) % SLURM_PORT_SPAN), "SLURM_JOB_ID"
    return None


def setting(key: str, environ: Mapping[str, str], hostnames: Runner = _scontrol_hostnames) -> Optional[Tuple[str, str]]:
    """``parallelism.<key>`` as the scheduler's environment ``environ`` gives it, with the variable it
    came from, or None when no variable sets it (order: the module's table).

    Args:
        key: one of ``nproc_per_node``, ``nnodes``, ``node_rank``, ``master_addr``, ``master_port``.
        environ: the environment (``os.environ``).
        hostnames: expands a Slurm node list (``scontrol show hostnames``); tests pass their own.

    Raises:
        UserError: a Slurm node list that cannot be expanded (see :func:`first_host`).
    """
    for table in (SWIFT, ELASTIC):
        if table[key] in environ:
            return environ[table[key]], table[key]
    found = _slurm(key, environ, hostnames)
    if found is not None:
        return found
    operator = {"nnodes": "WORLD_SIZE", "node_rank": "RANK"}.get(key)
    if operator is not None and operator in environ and "LOCAL_RANK" not in environ and "MASTER_ADDR" in environ:
        return environ[operator], operator
    return None
