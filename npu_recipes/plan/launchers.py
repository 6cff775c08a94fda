"""Job files for schedulers, written by ``stage=plan plan.launcher=slurm|kubernetes``.

Both run the same ``python -m npu_recipes ...`` on every node; npu_recipes reads the scheduler's
variables (:mod:`npu_recipes.config.schedulers`) and starts torchrun with the c10d rendezvous for
``nproc_per_node`` processes on its node (:mod:`npu_recipes.runtime.launch`):

- Slurm: an sbatch script with one task per node (``srun --ntasks-per-node=1``); the first host of
  the job's node list is the rendezvous address, the port comes from the job id, and ``output_dir``
  is a job-specific folder under the submission directory (which every node must share).
- Kubernetes: a Kubeflow training operator ``PyTorchJob`` (``kubeflow.org/v1``) with one Master and
  ``nnodes - 1`` Workers, one pod per node; the operator sets ``MASTER_ADDR``/``MASTER_PORT`` and,
  per pod, ``WORLD_SIZE`` (pods) and ``RANK``. ``output_dir`` lies on a shared volume claim
  (:data:`SHARED_CLAIM`, mounted at :data:`SHARED_MOUNT`), which every pod mounts.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Dict, List, Sequence

from omegaconf import OmegaConf

from npu_recipes.config.schema import ParallelismConfig
from npu_recipes.runtime import devices

SLURM, KUBERNETES = "slurm", "kubernetes"
SHARED_CLAIM, SHARED_MOUNT = "npu-recipes-shared", "/shared"
SOCKET_IFNAME = "eth0"
"""The network interface the nodes reach each other on, when the shell does not set one: edit it to your nodes' (``ip -br addr``)."""
RESOURCE = {"npu": "huawei.com/Ascend910", "cuda": "nvidia.com/gpu"}
"""Kubernetes extended resource of one device: Ascend's device plugin and NVIDIA's."""
_SET_BY_THE_JOB = ("parallelism.node_rank=", "parallelism.master_addr=", "parallelism.master_port=", "output_dir=")
"""Overrides the job sets itself on each node (from the scheduler's variables), dropped from the user's arguments."""


def job_arguments(user_args: Sequence[str]) -> List[str]:
    """The user's overrides without those the scheduler decides per node (node rank, master, output_dir)."""
    return [arg for arg in user_args if not arg.lstrip("+").startswith(_SET_BY_THE_JOB)]


def _environment(parallelism: ParallelismConfig, device_type: str) -> Dict[str, str]:
    environment = {"NPROC_PER_NODE": str(parallelism.nproc_per_node)}
    collective = {"npu": "HCCL_SOCKET_IFNAME", "cuda": "NCCL_SOCKET_IFNAME"}.get(device_type)
    if collective:
        environment[collective] = SOCKET_IFNAME
    environment["GLOO_SOCKET_IFNAME"] = SOCKET_IFNAME
    return environment


def sbatch_script(recipe: str, parallelism: ParallelismConfig, device_type: str, user_args: Sequence[str]) -> str:
    """An sbatch script for ``parallelism.nnodes`` nodes x ``nproc_per_node`` devices of ``device_type``.

    Interface variables default to :data:`SOCKET_IFNAME` only where the submitting shell sets none;
    ``MASTER_PORT`` and ``OUTPUT_DIR`` likewise keep a value the shell sets.
    """
    device = devices.Device(device_type, parallelism.nproc_per_node)
    lines = [
        "#!/bin/bash",
        f"# Written by npu_recipes' plan stage for recipe {recipe}: {parallelism.nnodes} node(s) x "
        f"{parallelism.nproc_per_node} {device_type} process(es). Submit with: sbatch THIS_FILE",
        f"#SBATCH --job-name=npu-recipes-{recipe}",
        f"#SBATCH --nodes={parallelism.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --exclusive",
        "#SBATCH --output=%x-%j.out",
        "set -euo pipefail",
    ]
    if device_type == "npu":
        lines.append(f"source {devices.CANN_SET_ENV}  # the Ascend (CANN) environment")
    if device.visibility_variable:
        lines.append(f"export {device.visibility_variable}={','.join(str(i) for i in range(parallelism.nproc_per_node))}")
    environment = _environment(parallelism, device_type)
    lines.append(f"export NPROC_PER_NODE={environment.pop('NPROC_PER_NODE')}")
    lines.append("# The interface the nodes reach each other on (ip -br addr): collectives and torchrun's rendezvous.")
    lines += [f"export {name}=${{{name}:-{value}}}" for name, value in environment.items()]
    lines += [
        '# torchrun\'s c10d rendezvous meets on the first node; every node reads SLURM_NNODES and SLURM_NODEID itself.',
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}",
        f'OUTPUT_DIR=${{OUTPUT_DIR:-$SLURM_SUBMIT_DIR/outputs/{recipe}/job-$SLURM_JOB_ID}}',
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 "
        + shlex.join(["python", "-m", "npu_recipes", *job_arguments(user_args)]) + ' "output_dir=$OUTPUT_DIR"',
    ]
    return "\n".join(lines) + "\n"


def _job_name(recipe: str) -> str:
    # Kubernetes names are DNS-1123 labels: lowercase letters, digits and '-'.
    return ("npu-recipes-" + re.sub(r"[^a-z0-9-]+", "-", recipe.lower())).strip("-")[:52]


def pytorchjob(recipe: str, parallelism: ParallelismConfig, device_type: str, user_args: Sequence[str], image: str) -> dict:
    """A Kubeflow ``PyTorchJob`` for ``parallelism.nnodes`` pods x ``nproc_per_node`` devices, as a dict for YAML."""
    name = _job_name(recipe)
    container = {
        "name": "pytorch",  # the operator's required container name
        "image": image,
        "command": ["python", "-m", "npu_recipes", *job_arguments(user_args), f"output_dir={SHARED_MOUNT}/outputs/{name}"],
        "env": [{"name": key, "value": value} for key, value in _environment(parallelism, device_type).items()],
        "volumeMounts": [{"name": "shared", "mountPath": SHARED_MOUNT}],
    }
    if device_type in RESOURCE:
        container["resources"] = {"limits": {RESOURCE[device_type]: parallelism.nproc_per_node}}
    template = {"spec": {"containers": [container],
                         "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}}]}}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if parallelism.nnodes > 1:
        replicas["Worker"] = {"replicas": parallelism.nnodes - 1, "restartPolicy": "Never", "template": template}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
            "spec": {"pytorchReplicaSpecs": replicas}}


def default_file(recipe: str, launcher: str) -> Path:
    """Where the job file goes without ``plan.launcher_file``: ``<recipe>.sbatch`` or ``<recipe>-pytorchjob.yaml`` here."""
    return Path(f"{recipe}.sbatch" if launcher == SLURM else f"{recipe}-pytorchjob.yaml")


def render(launcher: str, recipe: str, parallelism: ParallelismConfig, device_type: str, user_args: Sequence[str], image: str) -> str:
    """The job file's text for ``launcher`` (``slurm`` or ``kubernetes``)."""
    if launcher == SLURM:
        return sbatch_script(recipe, parallelism, device_type, user_args)
    return OmegaConf.to_yaml(OmegaConf.create(pytorchjob(recipe, parallelism, device_type, user_args, image)))
