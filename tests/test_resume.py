"""Resuming after a crash, and stopping cleanly on a signal, through the real CLI on the CPU.

The reference is one straight 30-step run (fp32, LoRA with dropout, so the RNG state matters too).
Another run of the same command is killed with SIGKILL at a random step after its first save, then
the same command is run again: it must continue from the newest complete checkpoint and end with
the straight run's adapter (within 1e-6) and logged losses.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npu_recipes.run import checkpoints
from tests.helpers import REPO, read_jsonl, run_cli, run_in_process

pytestmark = pytest.mark.slow

STEPS = 30
SAVE_STEPS = 5
ARGS = (
    "model=tiny_qwen2", "dataset=demo_math", "dataset.val_split_ratio=0", "device=cpu", "model.torch_dtype=float32",
    "train.learning_rate=1e-2", f"train.max_steps={STEPS}", "train.logging_steps=1", f"train.save_steps={SAVE_STEPS}",
    "train.per_device_train_batch_size=4", "train.gradient_accumulation_steps=4", "train.seed=7",
)


def _start(output_dir: Path, log_dir: Path, *extra: str) -> subprocess.Popen:
    log_dir.mkdir(parents=True, exist_ok=True)
    # Files, not pipes: nobody reads a pipe while the test polls the run directory.
    return subprocess.Popen(
        [sys.executable, "-m", "npu_recipes", *ARGS, *extra, f"output_dir={output_dir}"], cwd=REPO,
        stdout=open(log_dir / "stdout", "w"), stderr=open(log_dir / "stderr", "w"),
    )


def _train_steps(run: Path) -> list[int]:
    log = run / "logging.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip() and '"train"' in line]


def _wait_for_step(process: subprocess.Popen, run: Path, step: int, log_dir: Path) -> int:
    deadline = time.monotonic() + 600
    while True:
        steps = _train_steps(run)
        if steps and steps[-1] >= step and checkpoints.complete(run):
            return steps[-1]
        assert process.poll() is None, f"the run ended before step {step}: " + (log_dir / "stderr").read_text()[-3000:]
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.01)


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / f"checkpoint-{STEPS}" / "adapter_model.safetensors")


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "logging.jsonl") if r["type"] == "train"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    run_in_process(*ARGS, f"output_dir={run}")
    return run


def _assert_same_result(run: Path, straight: Path, after_step: int) -> None:
    reference, resumed = _adapter(straight), _adapter(run)
    assert sorted(resumed) == sorted(reference)
    for name, tensor in resumed.items():
        assert (tensor - reference[name]).abs().max().item() <= 1e-6, name
    losses, expected = _losses(run), _losses(straight)
    assert sorted(losses) == list(range(1, STEPS + 1)), "every step is logged exactly once"
    later = [step for step in expected if step > after_step]
    assert later, "the resumed run must train at least one step"
    assert [losses[step] for step in later] == pytest.approx([expected[step] for step in later], abs=1e-6)


def test_kill_9_then_resume_equals_a_straight_run(straight, tmp_path):
    run = tmp_path / "run"
    kill_at = random.Random().randint(SAVE_STEPS + 1, STEPS - 2)
    process = _start(run, tmp_path / "killed")
    try:
        _wait_for_step(process, run, kill_at, tmp_path / "killed")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    saved = checkpoints.complete(run)
    assert saved, f"killed at step {kill_at} before any complete checkpoint"
    resume_step = checkpoints.step_of(saved[-1])
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"

    refused = run_cli(*ARGS, "train.learning_rate=2e-2", f"output_dir={run}")
    assert refused.returncode == 2
    assert "train.learning_rate: 0.01 in the saved run, 0.02 now" in refused.stderr
    assert checkpoints.complete(run) == saved

    result = run_cli(*ARGS, f"output_dir={run}")
    assert result.returncode == 0, f"killed at step {kill_at}: " + result.stderr[-3000:]
    assert f"from checkpoint-{resume_step} (step {resume_step})" in result.stderr
    assert not list(run.glob(f"{checkpoints.PARTIAL_PREFIX}*"))
    _assert_same_result(run, straight, resume_step)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["final_metrics"]["steps"] == STEPS
    assert [entry["from_checkpoint"] for entry in manifest["resumes"]] == [str(saved[-1])]


def test_sigint_saves_the_current_step_and_the_rerun_finishes_the_run(straight, tmp_path):
    """Ctrl-C (SIGINT) at any step saves that step, exits 130 and says how to resume; with
    save_steps larger than the run, that checkpoint is the only one before the end."""
    run = tmp_path / "run"
    process = _start(run, tmp_path / "stopped", "train.save_steps=1000")
    try:
        deadline = time.monotonic() + 600
        while not _train_steps(run) or _train_steps(run)[-1] < 3:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "stopped" / "stderr").read_text()[-3000:]
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = (tmp_path / "stopped" / "stderr").read_text()
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    saved = checkpoints.complete(run)
    assert len(saved) == 1
    stopped_at = checkpoints.step_of(saved[0])
    assert 3 <= stopped_at < STEPS
    assert f"npu_recipes: stopped by SIGINT at step {stopped_at}; saved {saved[0]}" in stderr
    assert "Traceback" not in stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stopped_at_step"] == stopped_at

    result = run_cli(*ARGS, "train.save_steps=1000", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_result(run, straight, stopped_at)

    again = run_cli(*ARGS, "train.save_steps=1000", f"output_dir={run}")
    assert again.returncode == 0 and "already completed (checkpoint-30); nothing to train" in again.stderr
