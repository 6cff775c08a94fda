"""Resuming after what real users and schedulers do to a run: changed intervals, a kill after the
last save, lowered max_steps, damaged or foreign files, changed data, stale or live processes, a
branch rerun, a launcher killed with -9 under torchrun, SIGTERM before training. Real CLI runs on
the tiny model (a few steps each) plus in-process checks of the config rules."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npu_recipes.config import compose
from npu_recipes.errors import UserError
from npu_recipes.run import checkpoints, lock, resume
from tests.helpers import REPO, read_jsonl, run_cli, run_in_process

ARGS = ("model=tiny_qwen2", "dataset=demo_math", "dataset.max_samples=200", "dataset.val_split_ratio=0", "device=cpu",
        "model.torch_dtype=float32", "train.logging_steps=1", "train.per_device_train_batch_size=4",
        "train.gradient_accumulation_steps=1")


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(run / "logging.jsonl") if r["type"] == "train"]


def _saved(run: Path) -> list[int]:
    return [checkpoints.step_of(p) for p in checkpoints.complete(run)]


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _edit_manifest(run: Path, **fields) -> None:
    manifest = _manifest(run)
    manifest.update(fields)
    (run / "manifest.json").write_text(json.dumps(manifest))


def _one_clean_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("npu_recipes: error:") == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr


def _start(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "npu_recipes", *ARGS, *extra, f"output_dir={run}"], cwd=REPO,
                            stdout=open(f"{run}.stdout", "w"), stderr=open(f"{run}.stderr", "w"))


def _wait_until(process: subprocess.Popen, run: Path, ready) -> None:
    deadline = time.monotonic() + 600
    while not ready():
        assert process.poll() is None, Path(f"{run}.stderr").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _logged_step(run: Path, step: int):
    def ready() -> bool:
        try:
            return bool(_train_steps(run)) and _train_steps(run)[-1] >= step
        except (OSError, ValueError):
            return False
    return ready


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A finished 4-step run that saved checkpoint-2 and checkpoint-4; tests continue copies of it."""
    run = tmp_path_factory.mktemp("base") / "run"
    run_in_process(*ARGS, "train.max_steps=4", "train.save_steps=2", f"output_dir={run}")
    return run


def _train(caplog, *args: str) -> str:
    """Run the train stage in this process (a resume that should succeed); returns what it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_in_process(*args)
    return caplog.text


def _copy(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    return run


@pytest.mark.slow
def test_resume_applies_new_intervals_and_never_trains_past_max_steps(base, tmp_path, caplog):
    run = _copy(base, tmp_path)
    # transformers would keep the checkpoint's save_steps=2 and logging_steps=1 (saving 6 and 8, logging every step).
    _train(caplog, *ARGS, "train.max_steps=8", "train.save_steps=5", "train.logging_steps=2", f"output_dir={run}")
    assert _saved(run) == [2, 4, 5, 8]
    assert _train_steps(run) == [1, 2, 3, 4, 6, 8]

    # What a kill -9 between the last save and the end of the run leaves: status running, a dead pid.
    _edit_manifest(run, status="running", pid=2**22 + 1)
    again = _train(caplog, *ARGS, "train.max_steps=8", "train.save_steps=5", "train.logging_steps=2", f"output_dir={run}")
    assert "checkpoint-8 is at train.max_steps=8: nothing left to train" in again
    assert _saved(run) == [2, 4, 5, 8], "no step past max_steps"
    assert _train_steps(run) == [1, 2, 3, 4, 6, 8]
    assert _manifest(run)["status"] == "completed"

    lowered = _one_clean_error(run_cli(*ARGS, "train.max_steps=6", "train.save_steps=5", "train.logging_steps=2", f"output_dir={run}"))
    assert (f"the run in {run} has already trained 8 steps (checkpoint-8), more than train.max_steps=6: nothing to train"
            in lowered)
    assert _saved(run) == [2, 4, 5, 8]


@pytest.mark.slow
def test_damaged_files_in_a_run_are_skipped_or_named(base, tmp_path, caplog):
    run = _copy(base, tmp_path)
    # A log append cut short (no newline) and a newest checkpoint whose trainer state lost its end.
    with open(run / "logging.jsonl", "a") as log:
        log.write('{"step": 5, "type": "tr')
    state = run / "checkpoint-4" / checkpoints.TRAINER_STATE
    state.write_text(state.read_text()[:40])

    refused = _one_clean_error(run_cli(*ARGS, "train.max_steps=6", "train.save_steps=2", f"resume={run}/checkpoint-4",
                                       f"output_dir={tmp_path / 'branch'}"))
    assert f"resume={run}/checkpoint-4: its trainer_state.json is unreadable (JSONDecodeError" in refused
    assert not (tmp_path / "branch").exists()

    logged = _train(caplog, *ARGS, "train.max_steps=6", "train.save_steps=2", f"output_dir={run}")
    assert "not resuming from checkpoint-4: its trainer_state.json is unreadable" in logged
    assert "resuming the run in" in logged and "from checkpoint-2 (step 2)" in logged
    assert _train_steps(run) == [1, 2, 3, 4, 5, 6], "every step logged once, the cut-short line gone"
    assert _saved(run) == [2, 4, 6]
    assert checkpoints.damage(run / "checkpoint-4") is None, "checkpoint-4 was saved again, whole"

    (run / "manifest.json").write_text('{"status": "runn')
    broken = _one_clean_error(run_cli(*ARGS, "train.max_steps=8", "train.save_steps=2", f"output_dir={run}"))
    assert f"npu_recipes: error: {run}/manifest.json is not a JSON object (Unterminated string" in broken
    assert _saved(run) == [2, 4, 6]


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_one_error(base, tmp_path):
    foreign = tmp_path / "copied" / "checkpoint-4"
    shutil.copytree(base / "checkpoint-4", foreign)  # no resolved.yaml beside it to compare settings with
    run = tmp_path / "run"
    stderr = _one_clean_error(run_cli(*ARGS, "lora.r=16", "train.max_steps=6", f"resume={foreign}", f"output_dir={run}"))
    assert f"npu_recipes: error: cannot resume from {foreign}: its weights do not fit this run (RuntimeError: " in stderr
    assert "fix: resume from a checkpoint trained with this model" in stderr
    assert not run.exists(), "a run that failed before its first checkpoint leaves no directory"


@pytest.mark.slow
def test_resume_refuses_changed_data(tmp_path, caplog):
    source = Path(os.environ["NPU_RECIPES_CACHE"]) / "demo_math-v1-3000.jsonl"
    data = tmp_path / "data.jsonl"
    rows = source.read_text().splitlines(keepends=True)
    data.write_text("".join(rows[:40]))
    args = (*ARGS[:1], "dataset=local", f"dataset.path={data}", "dataset.messages_column=null",
            "dataset.user_template='{input}'", "dataset.assistant_template='{output}'", *ARGS[3:], "train.save_steps=2")
    run = tmp_path / "run"
    _train(caplog, *args, "train.max_steps=2", f"output_dir={run}")
    os.utime(data)  # touching or copying the file changes HF datasets' fingerprint, not the data
    data.write_text("".join(rows[:40]))
    assert "from checkpoint-2 (step 2)" in _train(caplog, *args, "train.max_steps=3", f"output_dir={run}")

    data.write_text("".join(rows[:30]))
    stderr = _one_clean_error(run_cli(*args, "train.max_steps=5", f"output_dir={run}"))
    assert f"cannot resume the run in {run}: its dataset changed since it was trained (rows: 40 in the saved run, 30 now; " in stderr
    assert _saved(run) == [2, 3]


@pytest.mark.slow
def test_a_branch_reruns_in_place_also_before_its_first_save(base, tmp_path, caplog):
    branch = tmp_path / "branch"
    command = ("train.max_steps=7", "train.save_steps=100", f"resume={base}/checkpoint-2", f"output_dir={branch}")
    killed = _start(branch, *command)
    _wait_until(killed, branch, _logged_step(branch, 3))
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert _saved(branch) == []

    stopped = _start(branch, *command)
    _wait_until(stopped, branch, _logged_step(branch, 4))
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = Path(f"{branch}.stderr").read_text()
    assert f"continuing it from {base}/checkpoint-2 (step 2), where it branched off" in stderr
    (stopped_at,) = _saved(branch)

    assert f"from checkpoint-{stopped_at} (step {stopped_at})" in _train(caplog, *ARGS, *command)
    assert _train_steps(branch) == [3, 4, 5, 6, 7]
    assert _saved(branch) == [stopped_at, 7]
    assert _saved(base) == [2, 4], "the branch never writes the run it came from"


@pytest.mark.slow
def test_a_checkpoint_without_optimizer_state_continues_only_from_its_weights_on_purpose(base, tmp_path, caplog):
    """checkpoint-4 lost its optimizer, scheduler and RNG state (as a save_only_model save leaves it):
    the rerun is refused (the troubleshooting row), and with resume_weights_only=true it continues
    from the weights, the manifest records it, and the learning rate continues its cosine schedule
    instead of jumping back to its peak. The continued run saves with train.save_only_model=true."""
    import torch
    from transformers import get_scheduler

    run = _copy(base, tmp_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (run / "checkpoint-4" / name).unlink()
    with pytest.raises(UserError, match=r"cannot resume exactly from .*checkpoint-4: it lacks optimizer.pt, scheduler.pt, rng_state.pth"):
        resume.check_before_data(_config(*ARGS, "train.max_steps=6", f"output_dir={run}"), False)
    logged = _train(caplog, *ARGS, "train.max_steps=6", "train.save_steps=2", "resume_weights_only=true", "train.save_only_model=true",
                    f"output_dir={run}")
    assert "resuming the run in" in logged and "(its weights alone: resume_weights_only=true)" in logged
    manifest = _manifest(run)
    assert manifest["resume_weights_only"] is True and manifest["resumes"][-1]["weights_only"] is True
    assert manifest["resume_from"] == str(run / "checkpoint-4") and manifest["status"] == "completed"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=6)
    after = [schedule.get_last_lr()[0]]  # the rate after 0, 1, ... scheduler steps; step N trains at after[N - 1]
    for _ in range(6):
        optimizer.step()
        schedule.step()
        after.append(schedule.get_last_lr()[0])
    rates = {r["step"]: r["learning_rate"] for r in read_jsonl(run / "logging.jsonl") if r["type"] == "train"}
    assert [rates[5], rates[6]] == pytest.approx([after[4], after[5]], rel=1e-6), "not after[0], the peak again"
    assert _saved(run) == [2, 4, 6]
    assert checkpoints.missing_resume_state(run / "checkpoint-6", 1, False) == ["optimizer.pt", "scheduler.pt", "rng_state.pth"]


@pytest.mark.slow
def test_the_lock_not_the_pid_decides_whether_a_run_is_in_use(base, tmp_path):
    run = _copy(base, tmp_path)
    # A process holding the run's lock, as a live launcher or a worker still saving would.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from npu_recipes.run import lock; lock.claim({str(run)!r}); "
         "print('held', flush=True); time.sleep(120)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    unrelated = subprocess.Popen(["sleep", "120"])
    try:
        assert holder.stdout.readline() == "held\n"
        _edit_manifest(run, status="running", pid=holder.pid)
        busy = _one_clean_error(run_cli(*ARGS, "train.max_steps=6", "train.save_steps=2", f"output_dir={run}"))
        assert f"output_dir {run} is in use: process {holder.pid} on this host is still training in it" in busy
        holder.kill()
        holder.wait()
        # Then the pid is reused by an unrelated live process: that blocks nothing.
        _edit_manifest(run, status="running", pid=unrelated.pid)
        result = run_cli(*ARGS, "train.max_steps=6", "train.save_steps=2", f"output_dir={run}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert _saved(run) == [2, 4, 6]
    finally:
        for process in (holder, unrelated):
            process.kill()
            process.wait()


def _lock_is_free(run: Path) -> bool:
    descriptor = os.open(run / lock.LOCK, os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)


@pytest.mark.slow
def test_workers_of_a_launcher_killed_with_9_save_and_stop(tmp_path):
    run = tmp_path / "run"
    command = ("parallelism=ddp", "parallelism.nproc_per_node=2", "train.save_steps=100")
    launcher = _start(run, *command, "train.max_steps=40")
    _wait_until(launcher, run, _logged_step(run, 2))
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=60)
    deadline = time.monotonic() + 120
    while _manifest(run)["status"] == "running":
        assert time.monotonic() < deadline, "the orphaned workers went on training"
        time.sleep(0.1)
    manifest = _manifest(run)
    assert manifest["status"] == "interrupted" and manifest["error"] == "stopped by SIGTERM"
    (stopped_at,) = _saved(run)
    assert stopped_at == manifest["stopped_at_step"] < 40
    deadline = time.monotonic() + 60
    while not _lock_is_free(run):
        assert time.monotonic() < deadline, "a worker outlived the stop"
        time.sleep(0.1)
    assert _train_steps(run)[-1] == stopped_at, "nothing trained after the stop"

    result = run_cli(*ARGS, *command, f"train.max_steps={stopped_at + 1}", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _train_steps(run) == list(range(1, stopped_at + 2))


@pytest.mark.slow
def test_sigterm_before_training_exits_143_and_says_so(tmp_path):
    run = tmp_path / "run"
    process = _start(run, "train.max_steps=4")
    _wait_until(process, run, lambda: (run / "manifest.json").is_file())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = Path(f"{run}.stderr").read_text()
    assert "npu_recipes: terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    manifest = _manifest(run)
    assert manifest["status"] == "interrupted" and manifest["error"] == "terminated (SIGTERM)" and manifest["last_checkpoint"] is None


def _config(*overrides: str):
    return compose.compose(["model=tiny_qwen2", "device=cpu", *overrides])


@pytest.mark.parametrize("value,expected", [("true", True), ("'true'", True), ("'FALSE'", False), ("' Auto '", "auto"),
                                            ("false", False)])
def test_gradient_checkpointing_accepts_its_words_in_any_form(value, expected):
    assert _config(f"train.gradient_checkpointing={value}").train.gradient_checkpointing == expected


@pytest.mark.parametrize("value", ["1", "0", "1.0", "maybe", "null"])
def test_gradient_checkpointing_refuses_other_values(value):
    with pytest.raises(UserError, match=r"train.gradient_checkpointing=.* is not one of true, false, auto"):
        _config(f"train.gradient_checkpointing={value}")


def test_what_resume_allows_to_change():
    saved = _config()
    # The out-of-memory advice's first option must not make the run unresumable.
    assert resume.changed_settings(saved, _config("train.gradient_checkpointing=true")) == []
    with pytest.raises(UserError) as error:
        resume.check_compatible(_config("parallelism=ddp", "parallelism.nproc_per_node=2"), saved, Path("runs/x"))
    assert ("fix: resume with parallelism=ddp parallelism.nproc_per_node=2 parallelism.nnodes=1 "
            "(or parallelism=ddp NPROC_PER_NODE=2)") in str(error.value)


@pytest.mark.cli
def test_resume_path_must_be_a_whole_checkpoint(base, tmp_path):
    with pytest.raises(UserError) as error:
        resume.open_run_dir(_config(f"resume={base}", f"output_dir={tmp_path / 'a'}"), False)
    assert str(error.value) == (f"resume={base} is a run directory, not a checkpoint\n  fix: pass resume={base}/checkpoint-4 "
                                f"(its newest complete checkpoint), or output_dir={base} resume=auto to continue that run in place")
    partial = tmp_path / ".partial-checkpoint-6" / "checkpoint-6"
    shutil.copytree(base / "checkpoint-4", partial)
    with pytest.raises(UserError, match=r"is inside an unfinished save \(\.partial-\*\)"):
        resume.open_run_dir(_config(f"resume={partial}", f"output_dir={tmp_path / 'b'}"), False)
    with pytest.raises(UserError, match=r"has already trained 4 steps \(checkpoint-4\), as many as train.max_steps=4: nothing to train"):
        resume.open_run_dir(_config(f"resume={base}/checkpoint-4", "train.max_steps=4", f"output_dir={tmp_path / 'c'}"), False)
    damaged = tmp_path / "damaged"
    shutil.copytree(base, damaged)
    (damaged / "resolved.yaml").write_text("train: [\n")
    with pytest.raises(UserError, match=rf"cannot resume the run in {damaged}: its resolved.yaml is unreadable \(ParserError: "):
        resume.open_run_dir(_config(f"resume={damaged}/checkpoint-2", f"output_dir={tmp_path / 'd'}"), False)
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_rotation_keeps_the_checkpoint_just_saved_below_a_newer_one(tmp_path):
    """Resumed from checkpoint-2 because checkpoint-4 was damaged, the run saves checkpoint-3: with
    save_total_limit=1 rotation must keep 3 (the run's present), not only the highest step."""
    for step in (2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / checkpoints.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    checkpoints.rotate(tmp_path, 1, best=None, current=3)
    assert _saved(tmp_path) == [3, 4]


@pytest.mark.cli
def test_a_branch_whose_origin_is_gone_is_one_error(base, tmp_path):
    origin = tmp_path / "origin"
    shutil.copytree(base, origin)
    branch = tmp_path / "branch"
    resume.open_run_dir(compose.compose([*ARGS, f"resume={origin}/checkpoint-2", "train.max_steps=6", f"output_dir={branch}"]), False)
    shutil.rmtree(origin / "checkpoint-2")  # e.g. rotated away by the origin run's save_total_limit
    with pytest.raises(UserError, match=rf"the run in {branch} saved no checkpoint of its own, and the checkpoint it branched "
                                        rf"off, {origin}/checkpoint-2, is gone or damaged"):
        resume.open_run_dir(compose.compose([*ARGS, "train.max_steps=6", f"output_dir={branch}"]), False)


def test_out_of_memory_advice_says_when_it_starts_a_new_run(tiny_model_path):
    import torch

    from npu_recipes.plan import planner

    def out_of_memory(config, error, step):
        plan = planner.make(model=config.model, train_type=config.train_type, lora=config.lora, train=config.train,
                            parallelism=config.parallelism, device=config.device, options=config.plan)
        return planner.out_of_memory(error, step, plan, config.parallelism.name)

    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
    resumable = str(out_of_memory(_config("train.gradient_checkpointing=false"), error, 2))
    assert "next option that fits: train.gradient_checkpointing=true (" in resumable and "new output_dir" not in resumable
    new_run = str(out_of_memory(_config("train.gradient_checkpointing=true", "train.per_device_train_batch_size=8",
                                        "train.gradient_accumulation_steps=2"), error, 2))
    assert ("next option that fits: train.per_device_train_batch_size=1 train.gradient_accumulation_steps=16 (same global batch; "
            in new_run)
    assert "GiB per device) in a new output_dir (this run's checkpoints resume only with the settings that saved them)" in new_run


@pytest.mark.cli
def test_a_run_without_its_resolved_yaml_points_at_its_checkpoint(base, tmp_path):
    run = _copy(base, tmp_path)
    (run / "resolved.yaml").unlink()
    with pytest.raises(UserError) as error:
        resume.open_run_dir(_config(f"output_dir={run}"), False)
    assert str(error.value).endswith(f"or pass a new output_dir with resume={run}/checkpoint-4 to continue from its newest checkpoint")
