"""Hydra multirun: one run directory per job, jobs one after another, in one process and under torchrun."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import run_cli

pytestmark = pytest.mark.slow

PARALLELISMS = {
    "single": [],
    # Each job launches its own 2 workers through torchrun (gloo); master_port null lets torchrun
    # pick a free port per job.
    "ddp2": ["parallelism=ddp", "parallelism.nproc_per_node=2"],
}


@pytest.mark.parametrize("parallelism", sorted(PARALLELISMS))
def test_sweep_gives_one_complete_run_directory_per_job(tmp_path, tiny_model_path, parallelism):
    result = run_cli("-m", "train.learning_rate=1e-4,2e-4", "model=tiny_qwen2", "device=cpu", "train.max_steps=2",
                     "train.logging_steps=1", "train.gradient_accumulation_steps=1", "dataset.val_split_ratio=0",
                     *PARALLELISMS[parallelism], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    manifests = []
    for job, learning_rate in zip(jobs, (1e-4, 2e-4)):
        assert yaml.safe_load((job / "resolved.yaml").read_text())["train"]["learning_rate"] == learning_rate
        manifest = json.loads((job / "manifest.json").read_text())
        assert manifest["status"] == "completed" and (job / "checkpoint-2" / "adapter_model.safetensors").is_file()
        assert f"run directory: {job}" in result.stdout
        if parallelism == "ddp2":
            assert manifest["launch"]["world_size"] == 2 and f"{job}/resolved.yaml" in manifest["launch"]["command"]
        manifests.append(manifest)
    assert manifests[0]["finished_at"] <= manifests[1]["started_at"], "jobs must run one after another"
    assert not (tmp_path / "outputs" / "adhoc").exists()
