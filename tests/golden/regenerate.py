"""Regenerate tests/golden/tiny_lora_losses.json: `python -m tests.golden.regenerate` from the repo root.

Runs the CLI once with GOLDEN_OVERRIDES (fp32 on CPU, fixed seed) in a fresh cache, and records the
per-step losses from logging.jsonl. Run it only when a deliberate change alters training numerics,
and say why in the commit message.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import transformers

GOLDEN_FILE = Path(__file__).with_name("tiny_lora_losses.json")

GOLDEN_OVERRIDES = [
    "model=tiny_qwen2",
    "dataset=demo_math",
    "train_type=lora",
    "device=cpu",
    "model.torch_dtype=float32",
    "train.learning_rate=1e-2",
    "train.max_steps=12",
    "train.logging_steps=1",
    "train.per_device_train_batch_size=2",
    "train.gradient_accumulation_steps=2",
    "train.save_steps=100",
    "train.seed=42",
    "dataset.val_split_ratio=0",
    "lora.r=16",
    # The committed losses were made with checkpointing on (the default before `auto`); it draws
    # LoRA dropout masks in a different order from a run without it.
    "train.gradient_checkpointing=true",
]


def main() -> None:
    from tests.helpers import read_jsonl, run_cli

    with tempfile.TemporaryDirectory() as scratch:
        env = {"NPU_RECIPES_CACHE": f"{scratch}/cache", "HF_DATASETS_CACHE": f"{scratch}/hf"}
        result = run_cli(*GOLDEN_OVERRIDES, f"output_dir={scratch}/run", env=env)
        if result.returncode != 0:
            sys.exit(result.stderr)
        losses = [r["loss"] for r in read_jsonl(Path(scratch) / "run" / "logging.jsonl") if r.get("type") == "train"]
    payload = {
        "made_by": "python -m tests.golden.regenerate",
        "overrides": GOLDEN_OVERRIDES,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "losses": losses,
    }
    GOLDEN_FILE.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {len(losses)} losses to {GOLDEN_FILE}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
