"""Launch planning without starting workers: swift's environment variables, visible devices,
device runtimes, DeepSpeed configs, and the checks that must fail before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from npu_recipes.config import compose, validate
from npu_recipes.errors import UserError
from npu_recipes.runtime import deepspeed_config, devices, launch
from npu_recipes.runtime.devices import Device
from tests.helpers import run_cli

# Through the real CLI: each must fail in the launching process with exit 2, one error block, no
# traceback, no run directory and no torchrun output.
BEFORE_ANY_WORKER = {
    "more processes than visible NPUs": (
        {"ASCEND_RT_VISIBLE_DEVICES": "0"},
        ["device=npu", "parallelism=ddp", "parallelism.nproc_per_node=2"],
        "parallelism.nproc_per_node=2 processes need 2 NPUs (one each), but 1 is visible (ASCEND_RT_VISIBLE_DEVICES=0)",
    ),
    "npu without torch_npu": (
        {},
        ["device=npu", "parallelism=ddp", "parallelism.nproc_per_node=2"],
        "device=npu needs the torch_npu package, which is not installed",
    ),
    "NPROC_PER_NODE contradicts the config": (
        {"NPROC_PER_NODE": "4"},
        ["parallelism=ddp", "parallelism.nproc_per_node=2", "device=cpu"],
        "NPROC_PER_NODE=4 contradicts parallelism.nproc_per_node=2 (parallelism=ddp)",
    ),
}


@pytest.mark.cli
@pytest.mark.parametrize("case", sorted(BEFORE_ANY_WORKER))
def test_launch_mistakes_fail_before_any_worker_starts(case, tmp_path):
    env, overrides, expected = BEFORE_ANY_WORKER[case]
    run = tmp_path / "run"
    result = run_cli(*overrides, "train.max_steps=2", f"output_dir={run}", env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr
    assert result.stderr.count("npu_recipes: error:") == 1 and "fix:" in result.stderr
    assert "Traceback" not in result.stderr
    assert "launching" not in result.stderr and "torch.distributed" not in result.stderr
    assert not run.exists()


# The same checks in-process (launch.plan_launch is what the runner calls before prepare).
PLAN_MISTAKES = {
    "more processes than visible GPUs": (
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        ["device=cuda", "parallelism=zero3", "parallelism.nproc_per_node=4"],
        "parallelism.nproc_per_node=4 processes need 4 CUDA GPUs (one each), but 2 are visible (CUDA_VISIBLE_DEVICES=0,1)",
    ),
    "NPROC_PER_NODE with one process": (
        {"NPROC_PER_NODE": "2"},
        ["device=cpu"],
        "NPROC_PER_NODE=2 contradicts parallelism.nproc_per_node=1 (parallelism=single)",
    ),
    "DeepSpeed with a model spread over devices": (
        {},
        ["parallelism=zero3", "model.device_map=auto", "device=cpu"],
        "DeepSpeed ZeRO (parallelism=zero3) cannot combine with its own partitioning",
    ),
    "DDP with a model spread over devices": (
        {},
        ["parallelism=ddp", "model.device_map=auto", "device=cpu"],
        "2 processes (parallelism=ddp) would all claim the same devices",
    ),
    "parameter offload below stage 3": (
        {},
        ["parallelism=zero2", "parallelism.offload_param_device=cpu", "device=cpu"],
        "parallelism.offload_param_device=cpu needs ZeRO stage 3, but parallelism.zero_stage=2",
    ),
    "several nodes on the loopback address": (
        {},
        ["parallelism=ddp", "parallelism.nnodes=2", "device=cpu", "output_dir=/shared/run"],
        "needs the master node's address and a port",
    ),
    "several nodes on another loopback address": (
        {},
        ["parallelism=ddp", "parallelism.nnodes=2", "parallelism.master_addr=127.0.0.2", "parallelism.master_port=29400",
         "device=cpu", "output_dir=/shared/run"],
        "parallelism.master_addr=127.0.0.2 is a loopback address, which other machines cannot reach",
    ),
    "several nodes with a timestamped output_dir": (
        {},
        ["parallelism=ddp", "parallelism.nnodes=2", "parallelism.master_addr=10.0.0.1", "parallelism.master_port=29400"],
        "needs an explicit output_dir",
    ),
    "node_rank outside the nodes": (
        {},
        ["parallelism=ddp", "parallelism.nnodes=2", "parallelism.node_rank=2", "parallelism.master_addr=10.0.0.1"],
        "parallelism.node_rank=2 must be in [0, parallelism.nnodes=2)",
    ),
}


def _plan(config):
    return launch.plan_launch(config.parallelism, config.device, config.recipe, config.output_dir)


def _check_environment(config):
    launch.check_environment(config.parallelism, config.recipe)


@pytest.mark.parametrize("case", sorted(PLAN_MISTAKES))
def test_launch_plan_refuses(case, monkeypatch):
    env, overrides, expected = PLAN_MISTAKES[case]
    for variable in (*launch.ENVIRONMENT_SETTINGS, validate.SAME_HOST_NODES):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(UserError) as caught:
        _plan(compose.compose(overrides))
    assert expected in caught.value.message and caught.value.fix


def test_a_plan_runs_one_process_in_process_and_deepspeed_always_through_torchrun(monkeypatch):
    monkeypatch.delenv("NPROC_PER_NODE", raising=False)
    single = _plan(compose.compose(["device=cpu"]))
    assert single.in_process and single.world_size == 1
    lone_zero3 = _plan(compose.compose(["device=cpu", "parallelism=zero3_offload", "parallelism.nproc_per_node=1"]))
    assert not lone_zero3.in_process and lone_zero3.world_size == 1
    ddp = _plan(compose.compose(["device=cpu", "parallelism=ddp", "parallelism.master_port=29999"]))
    assert ddp.command(Path("/run/resolved.yaml"))[1:] == [
        "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1",
        "--master-port=29999", "--shutdown-timeout=300", "--log-dir=/dev/null", "-m", "npu_recipes.worker", "/run/resolved.yaml",
    ]


def test_torch_npu_error_names_the_package_and_the_version_to_install():
    with pytest.raises(UserError) as caught:
        devices.resolve("npu")
    import torch

    assert f"pip install torch-npu=={torch.__version__.split('+')[0]}" in caught.value.fix
    assert "set_env.sh" in caught.value.fix


def test_seed_environment_sets_the_process_count(monkeypatch):
    """NPROC_PER_NODE=4 ASCEND_RT_VISIBLE_DEVICES=0,1,2,3 swift sft --deepspeed zero3 ... composes to 4 processes."""
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    config = compose.compose(["parallelism=zero3"])
    assert config.parallelism.nproc_per_node == 4 and config.parallelism.zero_stage == 3
    launch.check_environment(config.parallelism, config.recipe)
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    with pytest.raises(UserError, match="NPROC_PER_NODE=8 contradicts parallelism.nproc_per_node=4"):
        _check_environment(compose.compose(["parallelism=zero3", "parallelism.nproc_per_node=4"]))
    monkeypatch.delenv("NPROC_PER_NODE")
    assert compose.compose(["parallelism=ddp"]).parallelism.nproc_per_node == 2


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5"])
def test_a_launch_variable_that_is_not_a_count_is_named(monkeypatch, value):
    monkeypatch.setenv("NPROC_PER_NODE", "")  # set to nothing: as if unset
    config = compose.compose([])
    launch.check_environment(config.parallelism, config.recipe)
    monkeypatch.setenv("NPROC_PER_NODE", value)
    with pytest.raises(UserError, match=rf"NPROC_PER_NODE='{value}' is not a whole number >= 1"):
        launch.check_environment(config.parallelism, config.recipe)


def test_multi_node_settings_become_torchrun_arguments(monkeypatch):
    for variable, value in {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}.items():
        monkeypatch.setenv(variable, value)
    config = compose.compose(["parallelism=zero2", "parallelism.nproc_per_node=8", "output_dir=/shared/run"])
    launch.check_environment(config.parallelism, config.recipe)
    # The same arguments on every node: the c10d rendezvous, not NODE_RANK, numbers the nodes.
    assert launch.torchrun_arguments(config.parallelism, config.output_dir) == [
        "--nproc-per-node=8", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400",
        f"--rdzv-id={launch.rendezvous_id('/shared/run')}", "--rdzv-conf=join_timeout=600", "--shutdown-timeout=300",
    ]
    assert launch.rendezvous_id("/shared/run") == launch.rendezvous_id("/shared/run/") != launch.rendezvous_id("/shared/run2")
    assert launch.torchrun_arguments(compose.compose(
        ["parallelism=ddp", "parallelism.nnodes=1", "parallelism.node_rank=0", "parallelism.master_addr=127.0.0.1",
         "parallelism.master_port=29400"]).parallelism, "/r") == [
        "--nproc-per-node=2", "--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1", "--master-port=29400",
        "--shutdown-timeout=300",
    ]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_every_loopback_address_is_loopback(address):
    assert validate.is_loopback(address)


@pytest.mark.parametrize("address", ["10.0.0.1", "128.0.0.1", "126.255.255.255", "::2", "node0.cluster", "0.0.0.0"])
def test_other_addresses_are_not_loopback(address):
    assert not validate.is_loopback(address)


@pytest.mark.parametrize("value,expected", [("0,1,2,3", ["0", "1", "2", "3"]), ("", []), ("1, 3", ["1", "3"]), ("0,-1,2", ["0"])])
def test_visible_device_ids(monkeypatch, value, expected):
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", value)
    assert devices.visible_device_ids("npu") == expected
    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES")
    assert devices.visible_device_ids("npu") is None and devices.visible_device_ids("cpu") is None


def test_deepspeed_configs_leave_trainer_values_auto():
    zero2 = deepspeed_config.build(compose.compose(["parallelism=zero2"]).parallelism, Device("npu", 4))
    assert zero2["zero_optimization"]["stage"] == 2 and "optimizer" not in zero2
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        assert zero2[key] == "auto"
    assert zero2["bf16"]["enabled"] == "auto" and zero2["fp16"]["enabled"] == "auto"

    zero3 = deepspeed_config.build(compose.compose(["parallelism=zero3"]).parallelism, Device("npu", 4))["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["stage3_gather_16bit_weights_on_model_save"] is True
    assert "offload_param" not in zero3 and "offload_optimizer" not in zero3

    offload = deepspeed_config.build(compose.compose(["parallelism=zero3_offload"]).parallelism, Device("npu", 4))
    zero = offload["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True} == zero["offload_param"]
    assert offload["optimizer"] == {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    on_cpu = deepspeed_config.build(compose.compose(["parallelism=zero3_offload"]).parallelism, Device("cpu", 1))
    assert on_cpu["zero_optimization"]["offload_param"]["pin_memory"] is False

    with pytest.raises(ValueError):
        deepspeed_config.build(compose.compose(["parallelism=ddp"]).parallelism, Device("cpu", 1))


def test_only_npu_turns_off_ddp_unused_parameter_search():
    assert Device("npu", 8).ddp_find_unused_parameters is False
    assert Device("cuda", 8).ddp_find_unused_parameters is None and Device("cpu", 1).ddp_find_unused_parameters is None
    assert Device("cpu", 1).worker_environment() == {"DS_ACCELERATOR": "cpu"}


def test_npu_workers_get_a_600_s_hccl_connect_timeout_unless_one_is_set(monkeypatch):
    monkeypatch.delenv("HCCL_CONNECT_TIMEOUT", raising=False)
    assert Device("npu", 8).worker_environment() == {"DS_ACCELERATOR": "npu", "HCCL_CONNECT_TIMEOUT": "600"}
    monkeypatch.setenv("HCCL_CONNECT_TIMEOUT", "1800")
    # The launcher updates its environment with this dict: the user's 1800 stays.
    assert Device("npu", 8).worker_environment() == {"DS_ACCELERATOR": "npu"}
    assert Device("cuda", 8).worker_environment() == {"DS_ACCELERATOR": "cuda"}


def test_a_node_other_than_node_zero_waits_for_the_run_directory_then_gives_up_by_name(tmp_path):
    from npu_recipes.run import rundir

    run = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        rundir.wait_for_node_zero(run, node_rank=1, timeout_s=0.6)
    assert caught.value.message == (f"node 1 waited 0.6 s (parallelism.join_timeout) for node 0 to create the run directory "
                                    f"{run}, and {run}/resolved.yaml did not appear")
    assert "parallelism.join_timeout" in caught.value.fix and not run.exists()
    run.mkdir()
    (run / "resolved.yaml").write_text("{}\n")
    rundir.wait_for_node_zero(run, node_rank=1, timeout_s=0)


def test_a_node_alone_fails_the_rendezvous_with_one_message(tmp_path):
    """torchrun's c10d rendezvous, in this process, for 2 nodes of which only this one arrives: after
    join_timeout the launcher raises WorkersFailed naming the endpoint and the timeout (no traceback)."""
    import socket

    from npu_recipes.config.schema import ParallelismConfig

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    parallel = ParallelismConfig(name="ddp", nnodes=2, master_addr="127.0.0.1", master_port=port, join_timeout=1)
    plan = launch.LaunchPlan(Device("cpu", 1), 2, False, launch.torchrun_arguments(parallel, str(tmp_path)))
    with pytest.raises(launch.WorkersFailed) as caught:
        launch.launch(parallel, plan, tmp_path)
    message = str(caught.value)
    assert message.startswith(f"node 0: the 2 nodes did not all join the rendezvous at 127.0.0.1:{port} within "
                              "parallelism.join_timeout=1 s (RendezvousTimeoutError")
    assert caught.value.exit_code == 1 and "fix: start every node with the same output_dir" in message


@pytest.mark.parametrize("global_batch,micro,nproc,nnodes,expected", [
    (16, 1, 1, 1, 16), (16, 1, 8, 2, 1), (256, 1, 8, 2, 16), (64, 2, 4, 1, 8), (48, 3, 8, 2, 1),
])
def test_global_batch_size_sets_accumulation(global_batch, micro, nproc, nnodes, expected):
    from npu_recipes.config.schema import ParallelismConfig

    parallel = ParallelismConfig(name="ddp", nproc_per_node=nproc, nnodes=nnodes)
    assert validate.accumulation_steps_for(global_batch, micro, parallel) == expected
    assert expected * micro * nproc * nnodes == global_batch


def test_a_global_batch_size_that_does_not_divide_is_refused_by_name():
    with pytest.raises(UserError) as caught:
        compose.compose(["parallelism=ddp", "parallelism.nproc_per_node=8", "parallelism.nnodes=2", "parallelism.node_rank=0",
                         "parallelism.master_addr=10.0.0.1", "parallelism.master_port=29400", "output_dir=/shared/run",
                         "train.per_device_train_batch_size=1", "train.global_batch_size=100"])
    assert caught.value.message == ("train.global_batch_size=100 is not a multiple of train.per_device_train_batch_size=1 x "
                                    "world size 16 (parallelism=ddp: 8 process(es) x 2 node(s)) = 16 samples per micro-step")
    assert caught.value.fix.startswith("pass train.global_batch_size=96 or 112")
    with pytest.raises(UserError, match="train.global_batch_size=3 is not a multiple"):
        compose.compose(["parallelism=ddp", "parallelism.nproc_per_node=4", "train.global_batch_size=3"])
    config = compose.compose(["parallelism=ddp", "parallelism.nproc_per_node=4", "train.per_device_train_batch_size=2",
                              "train.global_batch_size=64", "train.gradient_accumulation_steps=1"])
    assert config.train.gradient_accumulation_steps == 8 and config.train.global_batch_size == 64


def test_nodes_that_read_another_token_than_node_zero_are_named(tmp_path):
    from npu_recipes.run import shared_storage
    from npu_recipes.run.shared_storage import Sighting

    token = shared_storage.write_token(tmp_path)
    assert shared_storage.read_token(tmp_path) == token and len(token) == 32
    assert shared_storage.read_token(tmp_path / "elsewhere") is None
    shared = [Sighting(0, "a", token), Sighting(0, "a", token), Sighting(1, "b", token)]
    assert shared_storage.unshared(shared) == []
    split = [Sighting(1, "b", None), Sighting(0, "a", token), Sighting(2, "c", "old"), Sighting(2, "c", "old"), Sighting(3, "d", token)]
    assert shared_storage.unshared(split) == [Sighting(1, "b", None), Sighting(2, "c", "old")]
    error = shared_storage.refusal(tmp_path, shared_storage.unshared(split))
    assert error.message == (f"node 1 (host b) (and 1 other node(s)) does not see the run directory node 0 writes: "
                             f"{tmp_path}/.shared-storage-check is missing there, so checkpoints and records would be "
                             "split between the nodes' disks")
    assert "filesystem every node mounts at the same path" in error.fix


def test_a_lost_connection_to_another_node_becomes_one_message_naming_the_nodes(tmp_path):
    from npu_recipes.run import lost_peer
    from npu_recipes.run.shared_storage import Sighting

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:58568: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")
    try:
        try:
            raise gloo
        except RuntimeError as error:
            raise ValueError("while saving") from error
    except ValueError as wrapped:
        assert lost_peer.library_line(wrapped) == "Read error [10.0.0.2]:58568: Connection reset by peer"
    assert lost_peer.library_line(ValueError("a bug")) is None
    sightings = [Sighting(0, "cn017", "t"), Sighting(1, "cn018", "t"), Sighting(1, "cn018", "t")]
    assert lost_peer.lost_peer(ValueError("a bug"), 0, 0, sightings, tmp_path) is None
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    lost = lost_peer.lost_peer(gloo, 0, 0, sightings, tmp_path)
    assert lost.message == ("rank 0 on node 0 lost its connection to another rank during training (Read error [10.0.0.2]:58568: "
                            "Connection reset by peer): node 1 (host cn018) of this job stopped or lost its network")
    assert lost.fix.endswith("then rerun the same command on every node (resume=auto continues from checkpoint-10)")
    assert str(lost).startswith(lost.message + "\n  fix: see that node's console")
