"""Real training runs of the tiny model (through the CLI, and one in this process), checked against committed numbers and files."""

from __future__ import annotations

import json

import pytest

from tests.golden.regenerate import GOLDEN_FILE, GOLDEN_OVERRIDES
from tests.helpers import read_jsonl, run_cli, run_in_process

pytestmark = pytest.mark.slow


def test_golden_losses(tmp_path):
    """Losses of a fixed fp32 CPU LoRA run equal the committed ones (tests/golden/tiny_lora_losses.json,
    made by `python -m tests.golden.regenerate`) within 1e-3 relative."""
    golden = json.loads(GOLDEN_FILE.read_text())
    result = run_cli(*GOLDEN_OVERRIDES, f"output_dir={tmp_path}/run")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "logging.jsonl") if r["type"] == "train"]
    assert losses == pytest.approx(golden["losses"], rel=1e-3)
    assert losses[-1] < losses[0] - 0.3


def test_gsm8k_first_200_rows_produce_a_complete_run_directory(tmp_path, gsm8k_dir):
    run = tmp_path / "gsm8k-run"
    result = run_cli(
        "model=tiny_qwen2", "dataset=gsm8k", f"dataset.path={gsm8k_dir / 'train.jsonl'}", "dataset.max_samples=200",
        "dataset.val_split_ratio=0.05", "device=cpu", "train.max_steps=20", "train.logging_steps=5",
        "train.save_steps=10", "train.eval_steps=10", "train.gradient_accumulation_steps=2",
        "train.learning_rate=5e-3", "train.max_length=512", "train.report_to=tensorboard", f"output_dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run directory: {run}" in result.stdout

    resolved = (run / "resolved.yaml").read_text()
    assert "train.jsonl" in resolved and "${" not in resolved

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["versions"]["torch"] and manifest["versions"]["transformers"] and manifest["versions"]["peft"]
    assert manifest["device"]["type"] == "cpu" and manifest["device"]["count"] == 1
    counts = manifest["dataset"]
    assert counts["rows"] == 200 and counts["held_out"] == 10 and counts["validation"] > 0
    assert counts["train"] + counts["dropped_too_long"] + counts["validation"] == 200
    assert len(counts["fingerprint"]) >= 8
    assert manifest["started_at"] <= manifest["finished_at"]
    assert manifest["final_metrics"]["steps"] == 20
    # train.gradient_checkpointing=auto, decided for this machine's RAM: the tiny model needs well under 1 GiB.
    decision = manifest["gradient_checkpointing"]
    assert decision["setting"] == "auto" and decision["enabled"] is False
    assert 0 < decision["without_checkpointing_gib"] * decision["margin"] < decision["usable_gib"]
    assert "gradient checkpointing auto: off" in result.stderr

    records = read_jsonl(run / "logging.jsonl")
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 5, 10, 15, 20]
    for record in train:
        assert record["loss"] > 0 and record["learning_rate"] >= 0 and record["grad_norm"] >= 0
        assert record["tokens_per_second"] > 0 and record["peak_memory_gib"] > 0
    assert [r["step"] for r in records if r["type"] == "eval"] == [10, 20]
    assert records[-1]["type"] == "summary"

    for step in (10, 20):
        checkpoint = run / f"checkpoint-{step}"
        assert (checkpoint / "adapter_model.safetensors").is_file()
        assert (checkpoint / "adapter_config.json").is_file()
        assert (checkpoint / "trainer_state.json").is_file()
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run.glob(".*tmp*"))


def test_full_fine_tuning_saves_a_loadable_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    run = tmp_path / "full"
    run_in_process("train_type=full", "device=cpu", "train.max_steps=3", "train.logging_steps=1",
                   "train.gradient_accumulation_steps=1", "dataset.val_split_ratio=0", f"output_dir={run}")
    checkpoint = run / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file() and not (checkpoint / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
