"""Checkpoint directories: only whole ones count, rotation spares the newest and the best, and a
full disk or an out-of-memory device during training ends in one clear message (real CLI runs,
with the fault injected by tests/faults.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from npu_recipes.run import checkpoints
from tests.helpers import REPO, read_jsonl, run_cli, run_faulty_cli, run_in_process


def _checkpoint(run: Path, step: int, complete: bool = True) -> Path:
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    if complete:
        (path / checkpoints.TRAINER_STATE).write_text("{}")
    return path


def test_only_whole_checkpoint_directories_count(tmp_path):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 5)
    _checkpoint(tmp_path, 20, complete=False)
    (tmp_path / "checkpoint-10-merged").mkdir()
    (tmp_path / checkpoints.PARTIAL_PREFIX / "x").mkdir(parents=True, exist_ok=True)
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["checkpoint-5", "checkpoint-10"]
    assert checkpoints.step_of(tmp_path / "checkpoint-10-merged") is None


def test_publish_replaces_an_older_checkpoint_of_the_same_step_whole(tmp_path):
    old = _checkpoint(tmp_path, 10)
    (old / "stale.bin").write_text("old branch")
    staging = checkpoints.staging_root(tmp_path, 10)
    new = _checkpoint(staging, 10)
    (new / "fresh.bin").write_text("new")
    checkpoints.publish(new, tmp_path / "checkpoint-10")
    assert sorted(p.name for p in (tmp_path / "checkpoint-10").iterdir()) == ["adapter_model.safetensors", "fresh.bin", "trainer_state.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]


@pytest.mark.parametrize(
    "limit,best,kept",
    [
        (None, 10, [5, 10, 15, 20, 25]),
        (0, None, [5, 10, 15, 20, 25]),
        (2, None, [20, 25]),
        (1, None, [25]),
        (1, 10, [10, 25]),
        (2, 10, [10, 25]),
        (3, 10, [10, 20, 25]),
        (1, 25, [25]),
        (1, 5, [5, 25]),
    ],
)
def test_rotation_never_deletes_the_newest_or_the_best(tmp_path, limit, best, kept):
    for step in (5, 10, 15, 20, 25):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 30, complete=False)
    checkpoints.rotate(tmp_path, limit, best)
    assert [checkpoints.step_of(p) for p in checkpoints.complete(tmp_path)] == kept
    assert (tmp_path / "checkpoint-30").is_dir(), "an incomplete directory is not rotation's to delete"


def test_best_step_is_the_saved_step_with_the_lowest_eval_loss():
    history = [{"loss": 3.0, "step": 2}, {"eval_loss": 2.0, "step": 2}, {"eval_loss": 1.5, "step": 3}, {"eval_loss": 1.7, "step": 4}]
    assert checkpoints.best_evaluation(history, steps=[2, 4])[0] == 4
    assert checkpoints.best_evaluation(history, steps=[2, 3, 4])[0] == 3
    assert checkpoints.best_evaluation([{"loss": 1.0, "step": 1}], steps=[1]) is None
    assert checkpoints.best_evaluation(history, greater=True, steps=[2, 3, 4])[0] == 2
    assert checkpoints.best_evaluation(history, "loss") == (3, 1.5), "transformers' short name of eval_loss"


@pytest.mark.parametrize("world_size,deepspeed,present,missing", [
    (1, False, ["optimizer.pt", "scheduler.pt", "rng_state.pth"], []),
    (1, False, [], ["optimizer.pt", "scheduler.pt", "rng_state.pth"]),
    (2, False, ["optimizer.pt", "scheduler.pt", "rng_state_0.pth"], ["rng_state_1.pth"]),
    (2, True, ["scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "global_step5/"], []),
    (2, True, ["optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"], ["global_step5/ (DeepSpeed's optimizer states)"]),
])
def test_an_exact_resume_needs_optimizer_scheduler_and_rng_state_of_every_rank(tmp_path, world_size, deepspeed, present, missing):
    """The files transformers' Trainer writes for each, and skips without a word when absent on resume."""
    checkpoint = _checkpoint(tmp_path, 5)
    for name in present:
        (checkpoint / name).mkdir() if name.endswith("/") else (checkpoint / name).write_bytes(b"state")
    assert checkpoints.missing_resume_state(checkpoint, world_size, deepspeed) == missing


COMMON = ("model=tiny_qwen2", "dataset=demo_math", "dataset.max_samples=200", "device=cpu", "model.torch_dtype=float32",
          "train.logging_steps=1", "train.gradient_accumulation_steps=1", "train.per_device_train_batch_size=4")


@pytest.mark.slow
def test_save_total_limit_one_keeps_the_best_and_the_newest(tmp_path):
    """A constant learning rate of 0.5 makes the tiny model's eval loss jump around, so the best
    evaluation is not the last one; with save_total_limit=1 both checkpoints stay. Evaluations at
    every step and saves at every other one: the best is the best saved step, named by the manifest
    and trainer_state.json, and loaded at the end; the best evaluation overall is recorded too."""
    run = tmp_path / "run"
    run_in_process(*COMMON, "dataset.val_split_ratio=0.05", "train_type=full", "train.learning_rate=0.5",
                   "train.lr_scheduler_type=constant", "train.max_steps=12", "train.save_steps=2", "train.eval_steps=1",
                   "train.save_total_limit=1", "train.load_best_model_at_end=true", f"output_dir={run}")
    evals = {r["step"]: r["eval_loss"] for r in read_jsonl(run / "logging.jsonl") if r["type"] == "eval"}
    assert sorted(evals) == list(range(1, 13))
    saved = {step: loss for step, loss in evals.items() if step % 2 == 0}
    best = min(saved, key=saved.get)
    assert best != 12, f"the best evaluation must be an earlier one for this test to mean anything: {evals}"
    assert [checkpoints.step_of(p) for p in checkpoints.complete(run)] == [best, 12]
    recorded = json.loads((run / "manifest.json").read_text())["best_checkpoint"]
    overall = min(evals, key=evals.get)
    assert recorded == {"metric": "eval_loss", "greater_is_better": False, "checkpoint": str(run / f"checkpoint-{best}"),
                        "step": best, "value": saved[best], "best_evaluated_step": overall, "best_evaluated_value": evals[overall],
                        "loaded_at_end": True}
    state = json.loads((run / "checkpoint-12" / checkpoints.TRAINER_STATE).read_text())
    assert (state["best_model_checkpoint"], state["best_global_step"], state["best_metric"]) == (
        str(run / f"checkpoint-{best}"), best, saved[best])


@pytest.mark.slow
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_the_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    args = (*COMMON, "dataset.val_split_ratio=0", "train.max_steps=6", "train.save_steps=2", f"output_dir={run}")
    result = run_faulty_cli("no-space-at-checkpoint=4", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("npu_recipes: error:") == 1 and "Traceback" not in result.stderr
    assert (f"npu_recipes: error: no space left on the device holding {run} at step 4 (No space left on device: "
            f"{run}/{checkpoints.PARTIAL_PREFIX}checkpoint-4/checkpoint-4/") in result.stderr
    assert f"newest complete checkpoint: {run}/checkpoint-2" in result.stderr
    assert f"fix: free space there (df -h {run})" in result.stderr
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("no space left")

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "from checkpoint-2 (step 2)" in rerun.stderr
    assert [checkpoints.step_of(p) for p in checkpoints.complete(run)] == [2, 4, 6]


@pytest.mark.slow
def test_device_out_of_memory_names_the_plans_next_option(tmp_path):
    run = tmp_path / "run"
    result = run_faulty_cli("out-of-memory-at-step=3", *COMMON, "dataset.val_split_ratio=0", "train.max_steps=6",
                         "train.save_steps=100", f"output_dir={run}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("npu_recipes: error:") == 1 and "Traceback" not in result.stderr
    assert "npu_recipes: error: device out of memory at training step 3: CUDA out of memory. Tried to allocate 20.00 GiB" in result.stderr
    # gradient_checkpointing=auto chose "off" for the tiny model, so the first smaller option is turning it on.
    assert ("fix: the plan stage's next option that fits: train.gradient_checkpointing=true "
            "(recompute activations in the backward pass; estimated") in result.stderr
    assert "see every estimate with the same command plus stage=plan" in result.stderr
    assert not run.exists(), "a run that failed before its first checkpoint leaves no directory"


@pytest.mark.slow
@pytest.mark.parametrize("limit_kib,failing_writer", [(400, "safetensors"), (800, "torch.save")])
def test_a_real_file_size_limit_while_saving_is_one_message_and_leaves_no_partial_save(tmp_path, tiny_model_path, limit_kib, failing_writer):
    """A real failed write, not an injected one: the process's file-size limit (RLIMIT_FSIZE, what
    `ulimit -f` sets) lies between the sizes of a full checkpoint's files (model.safetensors about
    544 KiB, optimizer.pt about 1.1 MiB), so the first save fails in ``failing_writer``, which reports
    it in its own way (SafetensorError "os error 27"; torch.save a bare stream error)."""
    import resource

    from npu_recipes.data import demo

    rows = tmp_path / "rows.jsonl"
    demo.write(rows, 64)
    run = tmp_path / "run"
    limit = limit_kib * 1024
    result = subprocess.run(
        [sys.executable, "-m", "npu_recipes", *COMMON, "dataset.builder=null", f"dataset.path={rows}", "dataset.val_split_ratio=0",
         "train_type=full", "train.max_steps=3", "train.save_steps=2", f"output_dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("npu_recipes: error:") == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"npu_recipes: error: no space left on the device holding {run} at step 2 (" in result.stderr
    assert "no complete checkpoint was saved" in result.stderr
    assert not run.exists(), "a run that saved nothing leaves no directory (and gives its space back)"
