"""Bad input through the real CLI: one clear message, a non-zero exit, no traceback, no run directory."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli


def _rows_file(tmp_path, lines):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_ROW = json.dumps({"input": "2+2?", "output": "2 + 2 = 4", "answer": "4"})

CASES = {
    "misspelt key": (lambda tmp: ["train.learnin_rate=1e-4"], "did you mean 'train.learning_rate'"),
    "unknown group option": (lambda tmp: ["dataset=blossom"], "unknown option for dataset 'blossom'"),
    "unknown recipe": (lambda tmp: ["+recipe=qwen7b_lora"], "unknown recipe 'qwen7b_lora'"),
    "missing dataset file": (
        lambda tmp: ["dataset=local", f"dataset.path={tmp}/nope.jsonl"],
        "nope.jsonl' (dataset.path, dataset=local) does not exist",
    ),
    "malformed jsonl line": (
        lambda tmp: ["dataset=demo_math", "dataset.builder=null",
                     f"dataset.path={_rows_file(tmp, [GOOD_ROW, GOOD_ROW, '{broken', GOOD_ROW])}"],
        "rows.jsonl line 3: invalid JSON",
    ),
    "row missing a mapped column": (
        lambda tmp: ["dataset=demo_math", "dataset.builder=null",
                     f"dataset.path={_rows_file(tmp, [GOOD_ROW, json.dumps({'input': 'q', 'output': 'o'})])}"],
        "row 1 (0-based; record 2 of the file): column 'answer' is missing or empty; columns found in that row: input, output",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly(case, tmp_path):
    make_args, expected = CASES[case]
    run = tmp_path / "run"
    result = run_cli(*make_args(tmp_path), "device=cpu", "train.max_steps=2", f"output_dir={run}")
    assert result.returncode != 0
    assert expected in result.stderr
    assert result.stderr.count("npu_recipes: error:") == 1
    assert "Traceback" not in result.stderr
    assert not run.exists(), f"{case} left a run directory behind: {list(run.iterdir())}"


def test_existing_output_dir_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    result = run_cli("device=cpu", f"output_dir={tmp_path}")
    assert result.returncode != 0
    assert "already exists and is not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_a_directory_the_user_made_survives_a_failed_run(tmp_path):
    premade = tmp_path / "premade"
    premade.mkdir()
    result = run_cli("device=cpu", "dataset=local", f"dataset.path={tmp_path}/missing.jsonl", f"output_dir={premade}")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert premade.is_dir() and not any(premade.iterdir())


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = run_cli("device=cpu", f"output_dir={target}")
    assert result.returncode == 2 and "is an existing file, not a directory" in result.stderr
