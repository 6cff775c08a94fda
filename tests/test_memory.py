"""The memory estimator against measurements: saved tensors of a real layer, the ZeRO paper's own
figures, CPU peaks of real Trainer runs (bench/results/), and H200 peaks of the Qwen2-7B shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from npu_recipes.config.schema import LoraConfig
from npu_recipes.model.pretrained import shipped_config_dir
from npu_recipes.plan import memory, targets
from tests.helpers import REPO, SHARED

CPU = targets.TARGETS["cpu"]
H200 = targets.TARGETS["h200"]
CPU_CALIBRATION = REPO / "bench" / "results" / "memory_calibration_cpu.json"
H200_ANCHORS = SHARED / "bench" / "h200_hf_peft_anchor.jsonl"
TOLERANCE = 0.15

SMALL_QWEN2 = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 128, "intermediate_size": 352,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
    "max_position_embeddings": 512, "tie_word_embeddings": False,
}


def _config_dir(tmp_path: Path, config: dict) -> Path:
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _setting(train_type, dtype="float32", **overrides) -> memory.TrainSetting:
    values = dict(train_type=train_type, dtype=dtype, world_size=1, micro_batch=1, max_length=512,
                  gradient_checkpointing=True, gradient_accumulation_steps=1, lora_dropout=0.05)
    values.update(overrides)
    return memory.TrainSetting(**values)


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_layer_activations_equal_the_tensors_autograd_saves(tmp_path, train_type):
    """Count the bytes one real decoder layer saves for backward (saved_tensors_hooks, each storage once,
    parameters excluded) on CPU in fp32: the per-layer formula plus the shared RoPE tables, exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from npu_recipes.model import pretrained

    directory = _config_dir(tmp_path, SMALL_QWEN2)
    lora = LoraConfig()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    if train_type == "lora":
        model = pretrained.apply_lora(model, lora)
        model.enable_input_require_grads()
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    layer.register_forward_pre_hook(lambda *_: hooks.__enter__())
    layer.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))
    tokens = 64
    ids = torch.randint(0, SMALL_QWEN2["vocab_size"], (1, tokens))
    model(input_ids=ids, labels=ids).loss.backward()

    shape = memory.model_shape(str(directory), train_type, lora)
    per_token = memory.activation_bytes_per_token(shape, _setting(train_type), CPU)
    assert sum(saved.values()) == tokens * (per_token["layer"] + per_token["rope"])


def test_zero_partitioning_reproduces_the_zero_papers_example():
    """ZeRO paper, Figure 1: a 7.5B model, mixed-precision Adam (K = 12), 64 devices: 31.4 GB per device
    with ZeRO-1 (P_os), 16.6 GB with ZeRO-2 (P_os+g) and 1.9 GB with ZeRO-3 (P_os+g+p)."""
    params = 7_500_000_000
    shape = memory.ModelShape(
        model_type="gpt", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
        intermediate_size=16384, vocab_size=50000, declared_dtype="bfloat16", params=params, trainable_params=params,
        largest_trainable=50000 * 4096, largest_module_params=50000 * 4096, layer_params=params // 32,
    )

    def model_states_gb(zero_stage):
        setting = _setting("full", "bfloat16", zero_stage=zero_stage, world_size=64, gradient_accumulation_steps=16)
        parts = memory.estimate(shape, setting, H200).components
        return sum(parts[key].bytes for key in ("weights", "gradients", "optimizer_states")) / 1e9

    assert model_states_gb(1) == pytest.approx(31.4, abs=0.05)
    assert model_states_gb(2) == pytest.approx(16.6, abs=0.05)
    assert model_states_gb(3) == pytest.approx(1.9, abs=0.05)
    # Without DeepSpeed there is no fp32 master copy: AdamW's moments stay in bf16 (2 + 2 + 4 bytes).
    assert model_states_gb(None) == pytest.approx(8 * params / 1e9)


def _cpu_records():
    if not CPU_CALIBRATION.is_file():
        return []
    payload = json.loads(CPU_CALIBRATION.read_text())
    return [(payload["shapes"][r["shape"]], r) for r in payload["records"]]


def test_cpu_calibration_covers_lora_and_full_at_two_lengths():
    records = [record for _, record in _cpu_records()]
    covered = {(r["shape"], r["train_type"], r["max_length"], r["gradient_checkpointing"]) for r in records}
    for shape in ("tiny_qwen2", "mini"):
        for train_type in ("lora", "full"):
            for max_length in (512, 2048):
                assert (shape, train_type, max_length, True) in covered and (shape, train_type, max_length, False) in covered


@pytest.mark.parametrize("shape_config,record", _cpu_records(),
                         ids=lambda v: v["shape"] + "-" + "-".join(str(v[k]) for k in ("train_type", "dtype", "max_length", "gradient_checkpointing")) if "shape" in v else "")
def test_estimate_within_15_percent_of_cpu_measurements(tmp_path, shape_config, record):
    """bench/results/memory_calibration_cpu.json: peak bytes of live tensors in real Trainer runs on CPU,
    measured by `python bench/memory_calibration.py` (torch profiler allocator events)."""
    shape = memory.model_shape(str(_config_dir(tmp_path, shape_config)), record["train_type"], LoraConfig())
    setting = _setting(record["train_type"], record["dtype"], max_length=record["max_length"],
                       gradient_checkpointing=record["gradient_checkpointing"],
                       gradient_accumulation_steps=record["gradient_accumulation_steps"], micro_batch=record["micro_batch"])
    estimate = memory.estimate(shape, setting, CPU).total_gib
    assert estimate == pytest.approx(record["measured_peak_gib"], rel=TOLERANCE)


def _anchors():
    if not H200_ANCHORS.is_file():
        return []
    return [r for r in map(json.loads, H200_ANCHORS.read_text().splitlines()) if not r["liger"]]


@pytest.mark.parametrize("anchor", _anchors(), ids=lambda r: r["variant"])
def test_estimate_within_15_percent_of_h200_measurements(anchor):
    """../shared/bench/h200_hf_peft_anchor.jsonl: max_memory_allocated of the Qwen2-7B shape (random init,
    bf16, batch 1, no gradient accumulation) on one H200, LoRA r8 all-linear and full fine-tuning with
    torch AdamW. Liger-kernel variants are left out: fused kernels are not what the estimate models."""
    train_type = "full" if anchor.get("full") else "lora"
    shape = memory.model_shape(str(shipped_config_dir("Qwen/Qwen2-7B-Instruct")), train_type, LoraConfig())
    assert (shape.params - shape.trainable_params if train_type == "lora" else shape.params) == 7_615_616_512
    setting = _setting(train_type, "bfloat16", max_length=anchor["seq"], gradient_checkpointing=anchor["ckpt"])
    estimate = memory.estimate(shape, setting, H200)
    assert estimate.total_gib == pytest.approx(anchor["peak_alloc_gib"], rel=TOLERANCE)
    assert estimate.peak_phase == ("optimizer step" if train_type == "full" else "forward/backward")


def test_peak_is_the_sum_of_the_components_live_at_it(tmp_path):
    shape = memory.model_shape(str(shipped_config_dir("Qwen/Qwen2.5-14B-Instruct")), "lora", LoraConfig())
    for zero_stage, offload, world in ((None, False, 1), (None, False, 8), (2, False, 8), (3, False, 8), (3, True, 8)):
        setting = _setting("lora", "bfloat16", zero_stage=zero_stage, offload_optimizer=offload, offload_param=offload,
                           world_size=world, nproc_per_node=world, gradient_accumulation_steps=16)
        estimate = memory.estimate(shape, setting, targets.TARGETS["ascend_910b3"])
        live = sum(c.bytes for c in estimate.components.values() if c.at_peak)
        assert live == pytest.approx(estimate.total_bytes)
        assert (estimate.host_bytes > 0) == offload


def test_planning_does_not_draw_from_the_training_random_numbers(tiny_model_path):
    """The train stage plans ``gradient_checkpointing=auto`` between seeding and initialising LoRA; the
    planner's meta-device skeleton must leave torch's generator as it found it, or the same seed would
    give other initial weights with ``auto`` than with ``true``, and a second run in one process other
    weights than the first."""
    import torch

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    memory.model_shape(str(tiny_model_path), "lora", LoraConfig(r=3))
    assert torch.equal(torch.rand(4), expected)
