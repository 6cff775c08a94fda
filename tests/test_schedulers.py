"""Scheduler variables become torchrun settings (npu_recipes.config.schedulers), and stage=plan writes
Slurm and Kubernetes job files (npu_recipes.plan.launchers) that run one npu_recipes per node."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest
from omegaconf import OmegaConf

from npu_recipes.config import compose, schedulers
from npu_recipes.config.schema import ParallelismConfig
from npu_recipes.errors import UserError
from npu_recipes.plan import launchers

KEYS = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port")


def _hostnames(expected: str):
    def expand(nodelist: str) -> str:
        assert nodelist == expected
        return "cn017\ncn018\n"

    return expand


def _settings(environ, hostnames=None):
    return {key: schedulers.setting(key, environ, *([hostnames] if hostnames else [])) for key in KEYS}


def test_slurm_variables_give_nodes_rank_master_and_a_port_from_the_job():
    environ = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "cn[017-018]", "SLURM_JOB_ID": "123456"}
    assert _settings(environ, _hostnames("cn[017-018]")) == {
        "nproc_per_node": None,
        "nnodes": ("2", "SLURM_NNODES"),
        "node_rank": ("1", "SLURM_NODEID"),
        "master_addr": ("cn017", "SLURM_JOB_NODELIST"),
        "master_port": (str(15000 + 123456 % 20000), "SLURM_JOB_ID"),
    }


def test_the_kubernetes_operator_variables_count_pods():
    # What the training operator sets in the Worker pod of a 2-pod PyTorchJob without nprocPerNode.
    environ = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1"}
    assert _settings(environ) == {
        "nproc_per_node": None, "nnodes": ("2", "WORLD_SIZE"), "node_rank": ("1", "RANK"),
        "master_addr": ("job-master-0", "MASTER_ADDR"), "master_port": ("23456", "MASTER_PORT"),
    }
    # Inside a torchrun worker, WORLD_SIZE and RANK count processes, not pods.
    assert _settings({**environ, "LOCAL_RANK": "3"})["nnodes"] is None
    elastic = {**environ, "PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "8", "PET_MASTER_PORT": "29400"}
    assert _settings(elastic)["nproc_per_node"] == ("8", "PET_NPROC_PER_NODE")
    assert _settings(elastic)["node_rank"] == ("1", "PET_NODE_RANK")
    assert _settings(elastic)["master_port"] == ("23456", "MASTER_PORT")  # the operator's MASTER_PORT is swift's name: first


def test_swift_variables_win_and_nothing_set_gives_nothing():
    environ = {"NNODES": "4", "NODE_RANK": "3", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "PET_NNODES": "3"}
    assert _settings(environ)["nnodes"] == ("4", "NNODES") and _settings(environ)["node_rank"] == ("3", "NODE_RANK")
    assert _settings({"HOME": "/root"}) == dict.fromkeys(KEYS)


def test_a_slurm_node_list_that_cannot_be_expanded_is_one_message():
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST=cn1 names no host"):
        schedulers.first_host("cn1", lambda nodelist: "")


def test_composing_under_slurm_reads_the_job_through_scontrol(tmp_path, monkeypatch):
    """The parallelism options read Slurm's variables; the node list goes through the real subprocess
    path to an `scontrol` on PATH (a two-line script standing in for Slurm's)."""
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "cn017\\ncn018\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for name in (*schedulers.SWIFT.values(), *schedulers.ELASTIC.values(), "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "cn[017-018]", "SLURM_JOB_ID": "77"}.items():
        monkeypatch.setenv(name, value)
    parallel = compose.compose(["parallelism=zero3", "parallelism.nproc_per_node=8", "output_dir=/shared/run"]).parallelism
    assert (parallel.nnodes, parallel.node_rank, parallel.master_addr, parallel.master_port) == (2, 1, "cn017", 15077)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(UserError) as caught:
        compose.compose(["parallelism=ddp", "output_dir=/shared/run"])
    assert caught.value.message == "SLURM_JOB_NODELIST=cn[017-018] is set but scontrol is not on PATH to expand it"


TWO_BY_EIGHT = ParallelismConfig(name="zero3", nproc_per_node=8, nnodes=2, zero_stage=3)
USER_ARGS = ["+recipe=qwen7b_lora_zero3", "parallelism.nproc_per_node=8", "parallelism.nnodes=2",
             "parallelism.node_rank=0", "parallelism.master_addr=10.0.0.1", "output_dir=/mine"]


def test_the_sbatch_script_runs_one_npu_recipes_per_node(tmp_path):
    script = launchers.render("slurm", "qwen7b_lora_zero3", TWO_BY_EIGHT, "npu", USER_ARGS, "unused")
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True).returncode == 0
    lines = script.splitlines()
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh  # the Ascend (CANN) environment" in lines
    assert "export ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in lines and "export NPROC_PER_NODE=8" in lines
    assert "export HCCL_SOCKET_IFNAME=${HCCL_SOCKET_IFNAME:-eth0}" in lines and "export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-eth0}" in lines
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    srun = shlex.split(lines[-1])
    # The node rank, master and output_dir are the job's per node, not the planning shell's.
    assert srun == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m", "npu_recipes", "+recipe=qwen7b_lora_zero3",
                    "parallelism.nproc_per_node=8", "parallelism.nnodes=2", "output_dir=$OUTPUT_DIR"]
    cpu = launchers.render("slurm", "demo", ParallelismConfig(name="ddp", nproc_per_node=2, nnodes=2), "cpu", ["device=cpu"], "")
    assert "Ascend" not in cpu and "VISIBLE_DEVICES" not in cpu and "HCCL" not in cpu


def test_the_pytorchjob_has_one_pod_per_node_with_the_devices_and_the_shared_volume():
    job = OmegaConf.to_container(OmegaConf.create(
        launchers.render("kubernetes", "qwen7b_lora_zero3", TWO_BY_EIGHT, "npu", USER_ARGS, "registry/npu-recipes:1")))
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == "npu-recipes-qwen7b-lora-zero3"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    for role in ("Master", "Worker"):
        pod = replicas[role]["template"]["spec"]
        container = pod["containers"][0]
        assert container["name"] == "pytorch" and container["image"] == "registry/npu-recipes:1"
        assert container["command"] == ["python", "-m", "npu_recipes", "+recipe=qwen7b_lora_zero3", "parallelism.nproc_per_node=8",
                                        "parallelism.nnodes=2", "output_dir=/shared/outputs/npu-recipes-qwen7b-lora-zero3"]
        assert container["resources"] == {"limits": {"huawei.com/Ascend910": 8}}
        assert {e["name"]: e["value"] for e in container["env"]} == {
            "NPROC_PER_NODE": "8", "HCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0"}
        assert pod["volumes"] == [{"name": "shared", "persistentVolumeClaim": {"claimName": "npu-recipes-shared"}}]


def test_the_plan_stage_writes_the_job_file(tmp_path, monkeypatch, capsys, tiny_model_path):
    from tests.helpers import run_in_process

    target = tmp_path / "two-nodes.sbatch"
    args = [f"model.name_or_path={tiny_model_path}", "parallelism=ddp", "parallelism.nnodes=2", "device=cpu"]
    monkeypatch.setattr("sys.argv", ["npu_recipes", *args, "stage=plan", "plan.launcher=slurm"])
    run_in_process(*args, "stage=plan", "plan.launcher=slurm", f"plan.launcher_file={target}")
    assert f"wrote the slurm job file {target}" in capsys.readouterr().err
    script = target.read_text()
    assert "#SBATCH --nodes=2" in script and "export NPROC_PER_NODE=2" in script and "Ascend" not in script
    assert script.splitlines()[-1].endswith(shlex.join(["npu_recipes", *args]) + ' "output_dir=$OUTPUT_DIR"')
