"""bench/train_throughput.py runs all three sides in one invocation and writes its JSON (a small workload)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from npu_recipes.model.attention import SDPA
from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_benchmark_runs_every_side_on_the_same_workload_and_writes_json(tmp_path):
    output = tmp_path / "throughput.json"
    result = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--samples", "16", "--cpu-threads", "1", "--output", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["device"]["type"] == "cpu" and report["versions"]["transformers"] and report["versions"]["torch"]
    workload = report["workload"]
    assert workload["samples"] == 16 and 16 <= workload["min_length"] <= workload["max_length"] <= 563
    assert set(report["sides"]) == {"a", "b", "c"}
    a, b, c = (report["sides"][side] for side in "abc")
    assert (a["micro_batch_size"], a["gradient_accumulation_steps"]) == (1, 16)
    # b packs all 16 samples (about 2,800 tokens) into 2048-token packs with per-sample SDPA.
    assert b["packing"]["samples"] == 16 and b["packing"]["tokens"] == workload["tokens"]
    assert b["packing"]["packs"] == report["plan"]["b_packs"] >= 2 and b["packing"]["attention"] == SDPA
    assert c["micro_batch_size"] == report["plan"]["c_batch_size"] >= 2
    for side in (a, b, c):
        assert side["epoch_s"] > 0 and side["tokens_per_s"] == pytest.approx(workload["tokens"] / side["epoch_s"], rel=1e-3)
        assert side["peak_memory_gib"] > 0 and side["lora_mfu"] > 0
    # Same random-init model, same random tokens: every side starts near ln(vocabulary) and ends alike.
    assert a["loss"] == pytest.approx(b["loss"], abs=0.05) and c["loss"] == pytest.approx(b["loss"], abs=0.05)
    assert set(report["ratios"]) >= {"b_speedup_over_a", "b_speedup_over_c", "b_peak_memory_over_a"}
