"""manifest.json: typed records written by one writer, read back tolerantly where a value is only
missing, refused with one message where a record is not what npu_recipes writes."""

from __future__ import annotations

import json

import pytest

from npu_recipes.errors import UserError
from npu_recipes.run import manifest
from npu_recipes.run.manifest import DatasetRecord, LaunchRecord, ResumeRecord

DATASET = DatasetRecord(name="demo_math", path="/data/demo.jsonl", fingerprint="abc", rows=40, held_out=1, train=39,
                        validation=1, dropped_too_long=0, dropped_no_assistant_tokens=0, truncated=0, train_tokens=1234)


def _write(directory, data) -> None:
    (directory / manifest.MANIFEST).write_text(json.dumps(data))


def test_records_round_trip_and_unknown_top_level_keys_survive(tmp_path):
    manifest.update(tmp_path, status=manifest.RUNNING, dataset=DATASET, launch=LaunchRecord(2, 2, 1, "torchrun ..."),
                    resumes=[ResumeRecord(at="now", from_checkpoint=None, command="python -m npu_recipes")])
    data = json.loads((tmp_path / manifest.MANIFEST).read_text())
    assert data["dataset"]["train_tokens"] == 1234 and data["launch"]["world_size"] == 2 and data["error"] is None
    data["written_by_a_newer_version"] = {"x": 1}
    _write(tmp_path, data)
    updated = manifest.update(tmp_path, status=manifest.COMPLETED)
    assert updated.dataset == DATASET and updated.resumes[0].command == "python -m npu_recipes"
    assert json.loads((tmp_path / manifest.MANIFEST).read_text())["written_by_a_newer_version"] == {"x": 1}


def test_a_misspelt_field_is_an_error_not_a_new_key(tmp_path):
    with pytest.raises(TypeError):
        manifest.update(tmp_path, stauts=manifest.RUNNING)


def test_null_values_read_as_their_defaults(tmp_path):
    _write(tmp_path, {name: None for name in ("status", "dataset", "resumes", "versions", "final_metrics")})
    read = manifest.read(tmp_path)
    assert read.status is None and read.dataset is None and read.resumes == [] and read.versions == {}


@pytest.mark.parametrize("key,value,problem", [
    ("dataset", {"name": "demo_math", "rows": 40}, "an object without"),
    ("dataset", "demo_math", "a str where an object of DatasetRecord belongs"),
    ("launch", {"world_size": 2}, "an object without command, nnodes, nproc_per_node"),
    ("resumes", {"a": 1}, "a dict where a list belongs"),
    ("resumes", [{"at": "x"}], "an object without command, from_checkpoint"),
])
def test_a_record_that_is_not_what_npu_recipes_writes_is_one_error(tmp_path, key, value, problem):
    """A hand edit that breaks a record: one message naming the key, raised when the manifest is read,
    which resume does before it changes anything in the run directory."""
    _write(tmp_path, {"status": "completed", key: value})
    with pytest.raises(UserError) as refused:
        manifest.read(tmp_path)
    assert f"its {key!r} is {problem}" in refused.value.message
    assert f"delete its {key!r} key" in refused.value.fix


def test_a_merged_models_training_run_must_be_a_path(tmp_path):
    _write(tmp_path, {"kind": "merged_model", "training_run": 5})
    with pytest.raises(UserError, match="its 'training_run' is a int, not the path of the training run"):
        manifest.training_run_of(tmp_path)
    _write(tmp_path, {"kind": "merged_model", "training_run": "/runs/a"})
    assert manifest.training_run_of(tmp_path) == "/runs/a"
    (tmp_path / manifest.MANIFEST).write_text("[]")
    with pytest.raises(UserError) as refused:
        manifest.training_run_of(tmp_path)
    assert "merge again" in refused.value.fix


def test_the_recorded_command_sets_the_launch_variables_that_were_set(monkeypatch):
    """Rerunning the recorded command on a node reproduces its launch: NNODES, NODE_RANK, MASTER_* and
    the visible devices are part of it; unset ones and unrelated variables are not."""
    import sys
    from pathlib import Path

    for name in manifest.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("ASCEND_RT_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setattr("sys.argv", ["npu_recipes", "+recipe=qwen7b_lora_zero3", "output_dir=/shared/run a"])
    python = Path(sys.executable).name
    assert manifest.command_line() == (
        "NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 ASCEND_RT_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 "
        f"{python} -m npu_recipes +recipe=qwen7b_lora_zero3 'output_dir=/shared/run a'"
    )
    assert "HOME" not in manifest.command_line() and "'output_dir=/shared/run a'" in manifest.command_line()
