"""Bad input through the real CLI: one clear message, a non-zero exit, no traceback, no run directory.

Each case of docs/troubleshooting.md runs in tests/test_troubleshooting.py; these are the rest.
"""

from __future__ import annotations

import pytest

from tests.helpers import run_cli


@pytest.mark.cli
def test_unknown_recipe_fails_cleanly(tmp_path):
    run = tmp_path / "run"
    result = run_cli("+recipe=qwen7b_lora", "device=cpu", f"output_dir={run}")
    assert result.returncode == 2
    assert "unknown recipe 'qwen7b_lora'" in result.stderr
    assert result.stderr.count("npu_recipes: error:") == 1 and "Traceback" not in result.stderr
    assert not run.exists()


@pytest.mark.cli
def test_a_directory_the_user_made_survives_a_failed_run(tmp_path):
    premade = tmp_path / "premade"
    premade.mkdir()
    result = run_cli("device=cpu", "dataset=local", f"dataset.path={tmp_path}/missing.jsonl", f"output_dir={premade}")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert premade.is_dir() and not any(premade.iterdir())

