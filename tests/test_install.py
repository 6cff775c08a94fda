"""conf/ and recipes/ ship inside the wheel: build it, install it alone, run from another directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_wheel_runs_the_demo_from_another_directory(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = wheels.glob("npu_recipes-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True,
    )
    assert (target / "npu_recipes" / "conf" / "config.yaml").is_file()
    assert (target / "npu_recipes" / "recipes" / "demo.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import npu_recipes, npu_recipes.paths as p; print(npu_recipes.__file__); print(p.conf_dir())"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert str(target) in where and str(REPO) not in where
    result = subprocess.run(
        [sys.executable, "-m", "npu_recipes", "+recipe=demo", "device=cpu", "train.max_steps=2", "output_dir=run"],
        cwd=elsewhere, env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (elsewhere / "run" / "checkpoint-2").is_dir()
    # A default demo run prints none of the warnings issue 17 found, and its dataset summary once.
    for noise in ("Warning", "Setting accelerator to CPU", "Gradient accumulation steps mismatch", "Retrying in"):
        assert noise not in result.stderr, (noise, result.stderr[-3000:])
    assert result.stderr.count("npu_recipes.data.tokenize: dataset demo_math: ") == 1
    # The wheel ships the catalogue's stored rows: `ls` answers from them.
    listed = subprocess.run([sys.executable, "-m", "npu_recipes", "ls"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "qwen14b_lora_zero3" in listed.stdout and "CPU (host RAM)" in listed.stdout, listed.stderr
