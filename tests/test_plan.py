"""stage=plan: offline from a directory holding only config.json, on every seed recipe; text and JSON
through the real CLI; the next option when a plan does not fit; clear errors when config.json cannot
be fetched."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from npu_recipes.config import compose
from npu_recipes.model.pretrained import shipped_config_dir
from npu_recipes.plan import planner, report
from tests.helpers import run_cli, run_in_process

QWEN2_7B = "Qwen/Qwen2-7B-Instruct"
QWEN2_5_14B = "Qwen/Qwen2.5-14B-Instruct"
# Public parameter counts of the base models (transformers' own count of config.json's architecture).
BASE_PARAMS = {QWEN2_7B: 7_615_616_512, QWEN2_5_14B: 14_770_033_664, "Qwen/Qwen1.5-14B-Chat": 14_167_290_880}
SEED_RECIPES = [name for name in compose.recipe_names() if name.startswith("qwen")]


def config_only(tmp_path: Path, model_id: str) -> Path:
    """A directory holding nothing but the model's config.json (the real values, as published on the Hub)."""
    directory = tmp_path / model_id.replace("/", "--")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped_config_dir(model_id) / "config.json", directory / "config.json")
    return directory


def _make_with_config(tmp_path, overrides):
    config = compose.compose(overrides)
    given = Path(config.model.name_or_path)
    model_dir = given if given.is_dir() else config_only(tmp_path, config.model.name_or_path)
    return config, planner.make(model=config.model, train_type=config.train_type, lora=config.lora, train=config.train,
                                parallelism=config.parallelism, device=config.device, options=config.plan, model_dir=str(model_dir))


def _make(tmp_path, overrides):
    return _make_with_config(tmp_path, overrides)[1]


@pytest.mark.parametrize("recipe", SEED_RECIPES)
def test_every_seed_recipe_plans_offline_from_config_json_alone(tmp_path, recipe):
    config, plan = _make_with_config(tmp_path, [f"+recipe={recipe}"])
    shape, estimate = plan.shape, plan.estimate
    launch = report.launch_for(config.parallelism, plan.target.device_type, [f"+recipe={recipe}"], config.output_dir)
    assert shape.params - shape.trainable_params == BASE_PARAMS[config.model.name_or_path]
    world = config.reference["devices"]
    assert config.parallelism.nproc_per_node * config.parallelism.nnodes == world
    assert plan.target.name == "ascend_910b3" and plan.dtype == "bfloat16"
    live = sum(c.bytes for c in estimate.components.values() if c.at_peak)
    assert live == pytest.approx(estimate.total_bytes)
    assert 0 < estimate.total_gib < plan.usable_gib and plan.fits and plan.suggestion is None
    assert launch.environment == {"ASCEND_RT_VISIBLE_DEVICES": ",".join(map(str, range(world)))}
    if world > 1:
        assert launch.workers == [
            "python", "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--nnodes=1", "--node-rank=0",
            "--master-addr=127.0.0.1", "--shutdown-timeout=300", f"--log-dir={os.devnull}", "-m", "npu_recipes.worker",
            "RUN_DIR/resolved.yaml",
        ]
        assert launch.worker_environment == {"DS_ACCELERATOR": "npu", "HCCL_CONNECT_TIMEOUT": "600"}
    else:
        assert launch.workers is None


def test_zero3_divides_weights_by_the_world_size(tmp_path):
    # The same activations need the same checkpointing (auto would decide per recipe).
    single = _make(tmp_path, ["+recipe=qwen14b_lora_single", "train.gradient_checkpointing=true"]).estimate.components
    zero3 = _make(tmp_path, ["+recipe=qwen14b_lora_zero3", "train.gradient_checkpointing=true"]).estimate.components
    zero2 = _make(tmp_path, ["+recipe=qwen14b_lora_zero2", "train.gradient_checkpointing=true"]).estimate.components
    assert zero3["weights"].bytes == pytest.approx(single["weights"].bytes / 8, rel=0.01)
    assert zero2["weights"].bytes == pytest.approx(single["weights"].bytes, rel=0.01)
    assert zero3["activations"].bytes == pytest.approx(single["activations"].bytes)


@pytest.mark.parametrize("device_memory_gib,enabled", [(None, False), (32.0, True)])
def test_gradient_checkpointing_auto_turns_it_off_only_when_the_estimate_without_it_fits_with_margin(
        tmp_path, device_memory_gib, enabled):
    """qwen7b_lora_single needs about 33 GiB without checkpointing at 2048 tokens: off on a 64 GB
    910B3 (60.7 GiB usable), on with a 910B4's 32 GB."""
    overrides = ["+recipe=qwen7b_lora_single"]
    if device_memory_gib:
        overrides.append(f"plan.device_memory_gib={device_memory_gib}")
    plan = _make(tmp_path, overrides)
    assert plan.setting.gradient_checkpointing is enabled
    without_checkpointing_gib = plan.checkpointing.without_checkpointing_gib
    assert 30 < without_checkpointing_gib < 36
    assert (without_checkpointing_gib * planner.AUTO_CHECKPOINTING_MARGIN > plan.usable_gib) is enabled
    forced_off = _make(tmp_path, [*overrides, "train.gradient_checkpointing=false"])
    assert forced_off.estimate.total_gib == pytest.approx(without_checkpointing_gib)
    if not enabled:
        assert plan.estimate.total_gib == pytest.approx(without_checkpointing_gib)


@pytest.mark.cli
def test_plan_prints_settings_launch_and_memory_through_the_cli(tmp_path):
    model = config_only(tmp_path, QWEN2_5_14B)
    result = run_cli("+recipe=qwen14b_lora_zero3", "stage=plan", f"model.name_or_path={model}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "48 layers, hidden 5120, 40 heads / 8 KV heads, intermediate 13824, vocab 152064" in out
    assert "micro-batch 1 x accumulation 16 x 8 device(s) = global batch 128" in out
    assert "reference       8 x 31 GB" in out
    assert "max_length 2048, gradient checkpointing off (auto: 35.2 GiB without it, x1.15, fits 60.7 GiB usable)" in out
    assert ("python -m torch.distributed.run --nproc-per-node=8 --nnodes=1 --node-rank=0 --master-addr=127.0.0.1 "
            f"--shutdown-timeout=300 --log-dir={os.devnull} -m npu_recipes.worker RUN_DIR/resolved.yaml") in out
    assert f"ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 python -m npu_recipes +recipe=qwen14b_lora_zero3 model.name_or_path={model}\n" in out
    assert "DS_ACCELERATOR=npu HCCL_CONNECT_TIMEOUT=600 (set by the launcher)" in out
    for label in ("weights", "gradients", "optimizer states", "activations", "logits and loss", "framework overhead", "total"):
        assert f"\n  {label} " in out
    assert "Ascend 910B3 (ascend_910b3): 64.0 GiB" in out and "verdict         fits" in out
    assert not (tmp_path / "outputs").exists(), "stage=plan must not create a run directory"


@pytest.mark.cli
def test_plan_json_matches_the_in_process_plan(tmp_path):
    model = config_only(tmp_path, QWEN2_7B)
    args = ["+recipe=qwen7b_lora_zero3", "stage=plan", f"model.name_or_path={model}", "plan.format=json", "train.max_length=512"]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    config, plan = _make_with_config(tmp_path, [a for a in args if a != "plan.format=json"])
    expected = report.to_dict(config, plan, report.launch_for(config.parallelism, plan.target.device_type, args, config.output_dir))
    assert printed["memory"] == expected["memory"] and printed["device"] == expected["device"]
    assert printed["settings"]["max_length"] == 512 and printed["settings"]["world_size"] == 4
    assert printed["reference"]["max_memory_gb_per_device"] == 22 and printed["reference"]["runtime_hours"] == 8.5
    assert printed["launch"]["environment"] == {"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3"}
    assert printed["launch"]["worker_environment"] == {"DS_ACCELERATOR": "npu", "HCCL_CONNECT_TIMEOUT": "600"}
    assert printed["launch"]["command"][-3:] == ["+recipe=qwen7b_lora_zero3", f"model.name_or_path={model}", "train.max_length=512"]
    components = printed["memory"]["components"]
    assert set(components) == {"weights", "gradients", "optimizer_states", "activations", "logits_and_loss",
                               "optimizer_step", "framework_overhead"}
    assert printed["memory"]["activations_gib"]["checkpointing_off"] > printed["memory"]["activations_gib"]["checkpointing_on"]
    assert printed["fits"] is True and printed["suggestion"] is None


@pytest.mark.parametrize(
    "overrides,expected",
    [
        # Full fine-tuning with DDP keeps bf16 weights, gradients, a bucket copy and AdamW moments on every device.
        (["+recipe=qwen7b_lora_ddp4", "train_type=full"], ["parallelism=zero2", "parallelism.nproc_per_node=4"]),
        (["+recipe=qwen7b_lora_single", "train.gradient_checkpointing=false", "train.max_length=16384"],
         ["train.gradient_checkpointing=true"]),
        # 14B LoRA on one 32 GB 910B4: only offloading the weights helps a single device.
        (["+recipe=qwen14b_lora_single", "plan.target=ascend_910b4"], ["parallelism=zero3_offload", "parallelism.nproc_per_node=1"]),
        (["+recipe=qwen7b_lora_zero3", "plan.target=a100_40gb", "train.max_length=32768"], ["train.max_length=16384"]),
    ],
)
def test_a_plan_that_does_not_fit_names_the_next_option_that_does(tmp_path, overrides, expected):
    plan = _make(tmp_path, overrides)
    assert not plan.fits
    assert plan.suggestion.overrides == expected
    followed = _make(tmp_path, overrides + expected)
    assert followed.fits and followed.estimate.total_gib == pytest.approx(plan.suggestion.total_gib, abs=0.01)


@pytest.fixture
def printed_plan(monkeypatch, capsys):
    """The JSON ``stage=plan`` prints for these overrides, the stage run in this process."""

    def run(*overrides):
        monkeypatch.setattr(sys, "argv", ["npu_recipes", *overrides])
        capsys.readouterr()
        run_in_process(*overrides)
        return json.loads(capsys.readouterr().out)

    return run


def test_suggestion_and_device_memory_override_in_the_printed_plan(tmp_path, printed_plan):
    model = config_only(tmp_path, QWEN2_7B)
    report = printed_plan("+recipe=qwen7b_lora_single", "stage=plan", f"model.name_or_path={model}", "plan.device_memory_gib=16",
                          "plan.format=json")
    assert report["device"]["memory_gib"] == 16 and report["device"]["usable_gib"] == 12.7
    assert report["fits"] is False
    assert report["suggestion"]["overrides"] == ["parallelism=zero3_offload", "parallelism.nproc_per_node=1"]
    assert report["suggestion"]["total_gib"] < 12.7


def test_plan_on_cpu_compares_all_processes_with_host_ram(tiny_model_path, printed_plan):
    report = printed_plan("model=tiny_qwen2", "stage=plan", "device=cpu", "parallelism=ddp", "parallelism.nproc_per_node=2",
                          "plan.format=json")
    assert report["device"]["target"] == "cpu" and report["settings"]["dtype"] == "float32"
    assert report["device"]["demand_gib"] == pytest.approx(2 * report["memory"]["total_gib"], abs=0.002)
    assert report["launch"]["environment"] == {}
    assert report["settings"]["architecture"]["hidden_size"] == 64


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="modelscope is installed here")
def test_a_shipped_model_plans_from_its_shipped_config_without_modelscope_and_says_so(printed_plan, caplog):
    """The seed's ModelScope id without the modelscope package: the config.json shipped with npu_recipes,
    a warning naming both, and a launch command without any config-only path."""
    plan = printed_plan("+recipe=qwen7b_lora_zero3", "stage=plan", "plan.format=json")
    assert plan["settings"]["config_json"] == f"{shipped_config_dir(QWEN2_7B)}/config.json"
    assert plan["settings"]["model_hub"] == "modelscope" and plan["launch"]["note"] is None
    assert plan["launch"]["command"] == ["python", "-m", "npu_recipes", "+recipe=qwen7b_lora_zero3"]
    assert "modelscope package is missing; using the copy of its config.json shipped with npu_recipes" in caplog.text


def test_the_printed_command_never_names_a_config_only_directory(tmp_path):
    """A shipped copy becomes its hub id again; another directory without weights gets a note."""
    model = compose.compose(["model=local", f"model.name_or_path={shipped_config_dir(QWEN2_7B)}"]).model
    arguments, note = report.user_arguments(["+recipe=qwen7b_lora_zero3", "stage=plan", f"model.name_or_path={model.name_or_path}"], model)
    assert (arguments, note) == (["+recipe=qwen7b_lora_zero3", f"model.name_or_path={QWEN2_7B}"], None)
    other = compose.compose(["model=local", f"model.name_or_path={config_only(tmp_path, QWEN2_7B)}"]).model
    arguments, note = report.user_arguments([f"model.name_or_path={other.name_or_path}", "stage=plan"], other)
    assert arguments == [f"model.name_or_path={other.name_or_path}"] and "holds no weights (config.json only)" in note


def test_a_hub_id_without_a_shipped_config_fails_offline_with_the_fix(monkeypatch, tmp_path):
    from npu_recipes.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError) as caught:
        run_in_process("stage=plan", "model.name_or_path=someone/Model-7B")
    assert "could not fetch config.json of 'someone/Model-7B' from the Hugging Face Hub" in str(caught.value)
    assert "model.name_or_path=DIR" in str(caught.value)


def test_unknown_target_lists_the_device_types():
    from npu_recipes.errors import UserError

    with pytest.raises(UserError, match=r"did you mean 'h200'.*ascend_910b3"):
        compose.compose(["stage=plan", "plan.target=h300"])


@pytest.mark.parametrize("name", sorted(planner.PARALLELISM_SETTINGS))
def test_suggested_parallelisms_set_what_their_group_option_sets(name):
    parallel = compose.compose([f"parallelism={name}"]).parallelism
    assert (parallel.zero_stage, parallel.offload_optimizer_device, parallel.offload_param_device) == planner.PARALLELISM_SETTINGS[name]


@pytest.mark.parametrize("rope,context,source", [
    (None, 32768, "max_position_embeddings=32768 in its config.json"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072,
     "32768 positions x rope_scaling factor 4 (yarn) in its config.json"),
    ({"rope_type": "linear", "factor": 2.0}, 65536, "32768 positions x rope_scaling factor 2 (linear) in its config.json"),
    ({"rope_type": "default", "rope_theta": 1e6}, 32768, "max_position_embeddings=32768 in its config.json"),
])
def test_the_context_is_max_position_embeddings_or_its_rope_scaled_length(tmp_path, rope, context, source):
    from npu_recipes.errors import UserError
    from npu_recipes.model import pretrained

    model_dir = config_only(tmp_path, QWEN2_5_14B)
    if rope is not None:
        config = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**config, "rope_scaling": rope}))
    assert pretrained.context_length(str(model_dir)) == (context, source)
    pretrained.check_max_length(context, str(model_dir), QWEN2_5_14B)
    with pytest.raises(UserError, match=rf"train.max_length={context + 1} exceeds the context of {QWEN2_5_14B}: {context} tokens"):
        pretrained.check_max_length(context + 1, str(model_dir), QWEN2_5_14B)


def test_the_plan_refuses_max_length_past_the_context_and_the_train_stage_plans_the_longest_row(tmp_path, tiny_model_path):
    """The issue's 1e8 tokens: refused with both numbers; and a run's planner sizes activations by the
    longest row its data has (here 100 tokens), not by train.max_length (4096)."""
    from npu_recipes.errors import UserError
    from npu_recipes.runtime import devices
    from npu_recipes.stages import train

    with pytest.raises(UserError, match=r"train.max_length=100000000 exceeds the context of .*tiny_qwen2-v1: 4096 tokens "
                                        r"\(max_position_embeddings=4096 in its config.json\)"):
        _make(tmp_path, ["device=cpu", "train.max_length=100000000"])
    config = compose.compose(["device=cpu", "train.max_length=4096", "train.per_device_train_batch_size=8"])
    planned = train._plan_here(config, devices.Device("cpu", 1), longest=100)
    expected = _make(tmp_path, ["device=cpu", "train.max_length=100", "train.per_device_train_batch_size=8"])
    assert planned.setting.max_length == 100
    assert planned.estimate.total_bytes == expected.estimate.total_bytes < _make(tmp_path, [
        "device=cpu", "train.max_length=4096", "train.per_device_train_batch_size=8"]).estimate.total_bytes
