"""The NaN guard through the real CLI, with NaN losses injected at chosen optimizer steps
(``nan_guard.inject_nan_at_steps``): skipped updates, records, checkpoints, and the stop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from npu_recipes.config import compose
from tests.helpers import read_jsonl, run_cli, run_in_process

pytestmark = pytest.mark.slow

RUN = ("device=cpu", "train.logging_steps=1", "train.save_steps=1", "train.gradient_accumulation_steps=1",
       "dataset.val_split_ratio=0")


def _adam_steps(checkpoint) -> set:
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
    return {int(entry["step"]) for entry in state.values()}


def test_bad_steps_are_skipped_and_counted(tmp_path, capsys):
    run = tmp_path / "run"
    run_in_process(*RUN, "train_type=full", "train.max_steps=6", "nan_guard.inject_nan_at_steps=[3,4]", f"output_dir={run}")
    records = read_jsonl(run / "logging.jsonl")
    skipped = [r for r in records if r["type"] == "skipped_step"]
    assert [(r["step"], r["reason"], r["consecutive"], r["skipped_steps"]) for r in skipped] == [
        (3, "non-finite loss", 1, 1), (4, "non-finite loss", 2, 2)]
    train = {r["step"]: r for r in records if r["type"] == "train"}
    assert train[3]["loss"] is None and train[3]["grad_norm"] is None
    assert train[2]["loss"] > 0 and train[5]["loss"] > 0 and train[5]["grad_norm"] > 0
    assert [train[step]["skipped_steps"] for step in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    # No checkpoint at a skipped step; AdamW's own step counter shows the two updates were never applied.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-5", "checkpoint-6"]
    assert [_adam_steps(run / f"checkpoint-{n}") for n in (2, 5, 6)] == [{2}, {3}, {4}]
    assert all(torch.isfinite(t).all() for t in load_file(run / "checkpoint-6" / "model.safetensors").values())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["final_metrics"]["skipped_steps"] == 2
    assert "skipped steps: 2" in capsys.readouterr().out


def test_consecutive_bad_steps_stop_the_run(tmp_path):
    run = tmp_path / "run"
    result = run_cli(*RUN, "train.max_steps=10", "nan_guard.inject_nan_at_steps=[2,3,4,5]",
                     "nan_guard.max_consecutive_bad_steps=3", "train.learning_rate=3e-4", f"output_dir={run}")
    assert result.returncode == 2
    assert result.stderr.count("npu_recipes: error:") == 1 and "Traceback" not in result.stderr
    assert "3 optimizer steps in a row (steps 2-4)" in result.stderr
    assert "model.torch_dtype=float32" in result.stderr and "train.learning_rate=0.0003" in result.stderr
    records = read_jsonl(run / "logging.jsonl")
    assert [r["step"] for r in records if r["type"] == "skipped_step"] == [2, 3, 4]
    assert max(r["step"] for r in records if r["type"] == "train") == 4
    assert all(r["mfu"] is None for r in records if r["type"] == "train"), "a CPU run without mfu.peak_tflops has no MFU"
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-1"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "steps 2-4" in manifest["error"]


def test_default_limit_is_five():
    config = compose.compose([])
    assert config.nan_guard.max_consecutive_bad_steps == 5 and config.nan_guard.inject_nan_at_steps == []
