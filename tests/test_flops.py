"""Model FLOPs, the chip peak table, and MFU in a real run's records."""

from __future__ import annotations

import json

import pytest
import torch

from npu_recipes.config import resolved
from npu_recipes.model import flops
from tests.helpers import read_jsonl, run_in_process


@pytest.mark.parametrize("name,label,peak", [
    ("Ascend910B1", "Ascend 910B1", 414.0),
    ("Ascend910B2C", "Ascend 910B2", 376.0),
    ("Ascend910B3", "Ascend 910B3", 313.0),
    ("Ascend910B4", "Ascend 910B4", 280.0),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "NVIDIA A100", 312.0),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", "NVIDIA H200 SXM", 989.4),
    ("NVIDIA H200 NVL", "NVIDIA H200 NVL", 835.0),
])
def test_peak_table(name, label, peak):
    assert flops.table_peak(name) == (label, peak)
    assert flops.resolve_peak(None, "npu", name, torch.bfloat16) == flops.Peak(peak, f"{label} dense bf16/fp16 peak")


def test_peak_resolution_rules():
    assert flops.table_peak("NVIDIA GeForce RTX 4090") is None
    assert flops.resolve_peak(None, "cuda", "NVIDIA GeForce RTX 4090", torch.bfloat16).tflops is None
    assert flops.resolve_peak(None, "cpu", "cpu (x86_64, 2 cores)", torch.float32).tflops is None
    assert flops.resolve_peak(None, "cuda", "NVIDIA H200", torch.float32).tflops is None
    assert flops.resolve_peak(250.0, "npu", "Ascend910B3", torch.bfloat16) == flops.Peak(250.0, "mfu.peak_tflops")
    assert flops.resolve_peak(0.5, "cpu", "cpu", torch.float32).tflops == 0.5


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config)


# Matmul weights of the model above, counted by hand: per layer q 64x64, k 64x32, v 64x32, o 64x64,
# gate/up/down 3 x 64x176; once the output head 100x64 (tied to the embedding, still a matmul).
PER_LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 176
MATMUL = 2 * PER_LAYER + 100 * 64


def test_full_fine_tuning_counts_6n():
    model = _tiny_qwen2()
    counted = flops.FlopsModel.from_model(model, model.config)
    assert counted == flops.FlopsModel(frozen_matmul_params=0, trainable_matmul_params=MATMUL, num_layers=2, attention_width=64)
    assert counted.dense_flops_per_token == 6 * MATMUL


def test_lora_counts_4n_frozen_plus_6n_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_qwen2(), LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    counted = flops.FlopsModel.from_model(model, model.config)
    # r x (in + out) per adapted linear: q (64+64), k (64+32), v (64+32), o (64+64), gate/up (64+176), down (176+64).
    lora = 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 176))
    assert (counted.frozen_matmul_params, counted.trainable_matmul_params) == (MATMUL, lora)
    assert counted.dense_flops_per_token == 4 * MATMUL + 6 * lora


def test_batch_flops_count_real_tokens_and_causal_attention():
    model = flops.FlopsModel(frozen_matmul_params=1000, trainable_matmul_params=10, num_layers=2, attention_width=64)
    # Samples of 5 and 3 real tokens (padded or packed alike): keys attended (1+2+3+4+5) + (1+2+3) = 21.
    expected = (4 * 1000 + 6 * 10) * 8 + 12 * 2 * 64 * 21
    assert model.batch_flops([5, 3]) == expected
    assert model.batch_flops([3, 2]) == (4 * 1000 + 6 * 10) * 5 + 12 * 2 * 64 * (1 + 2 + 3 + 1 + 2)


def test_utilisation():
    peak = flops.Peak(100.0, "test")
    assert flops.utilisation(50e12, 1.0, peak, world_size=1) == pytest.approx(0.5)
    assert flops.utilisation(50e12, 1.0, peak, world_size=2) == pytest.approx(0.25)
    assert flops.utilisation(50e12, 1.0, flops.Peak(None, "none"), world_size=1) is None


@pytest.mark.slow
def test_mfu_in_logging_and_manifest(tmp_path, capsys):
    """A LoRA run against a configured peak: per-record MFU = model TFLOP/s / peak, and the Trainer's
    total_flos is the 4·N·T + 6·N_lora·T + attention count of the tokens it saw."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    run_in_process("device=cpu", "train.max_steps=4", "train.logging_steps=2", "train.gradient_accumulation_steps=2",
                   "train.per_device_train_batch_size=2", "dataset.val_split_ratio=0", "mfu.peak_tflops=0.01",
                   "train.save_steps=100", f"output_dir={run}")
    records = read_jsonl(run / "logging.jsonl")
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 4]
    for record in train:
        assert record["model_tflops"] > 0
        assert record["mfu"] == pytest.approx(record["model_tflops"] / 0.01, rel=1e-3, abs=1e-5)
    summary = records[-1]
    assert summary["type"] == "summary" and summary["peak_tflops"] == 0.01
    assert summary["mfu"] == pytest.approx(summary["total_flos"] / summary["train_runtime"] / 0.01e12, rel=1e-3)

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["device"]["peak_tflops"] == 0.01 and manifest["device"]["peak_source"] == "mfu.peak_tflops"
    assert manifest["final_metrics"]["mfu"] == summary["mfu"] and manifest["final_metrics"]["skipped_steps"] == 0
    assert "MFU " in capsys.readouterr().out

    run_config = resolved.load_resolved(run / "resolved.yaml")
    base = AutoModelForCausalLM.from_pretrained(run_config.model.name_or_path)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    counted = flops.FlopsModel.from_model(lora, lora.config)
    tokens = summary["num_input_tokens_seen"]
    attention = summary["total_flos"] - counted.dense_flops_per_token * tokens
    per_key = 12 * counted.num_layers * counted.attention_width
    # Every real token attends to at least itself and at most max_length keys.
    assert per_key * tokens <= attention <= per_key * tokens * run_config.train.max_length
