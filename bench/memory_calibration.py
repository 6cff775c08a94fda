"""Measure the peak allocated memory of real Trainer steps and set it beside npu_recipes.plan.memory's estimate.

Each variant runs in its own process: a random-init model of the shape's config.json (built with
``from_config``, no weights read), wrapped by the train stage's own ``pretrained.apply_lora``, trained
for a few optimizer steps by transformers ``Trainer`` with the train stage's own
``TrainingArguments`` on rows of exactly ``max_length`` random tokens (every token labelled), the
worst case the planner assumes.

What is measured:

* CUDA / NPU: ``max_memory_allocated`` after the model is on the device (``devices.Device``).
* CPU: torch keeps no allocator statistics there, so the torch profiler's memory events are
  replayed (``profile_memory=True``: every allocation and free of the CPU allocator, with its size)
  and the running sum's maximum is added to the bytes of parameters and buffers that existed when
  profiling started. That is the same quantity as ``max_memory_allocated``: bytes of live tensors.
  The process's peak RSS is recorded beside it only to show how different it is (interpreter,
  libraries, allocator caches).

Usage (from the repository root)::

    python bench/memory_calibration.py                    # CPU: tiny_qwen2 and "mini", about 10 minutes on 2 cores
    python bench/memory_calibration.py --shapes qwen2_7b --device cuda --out bench/results/memory_calibration_cuda.json

Prints each measurement beside the estimate and writes one JSON file (device name, package versions,
the shapes' config.json, one record per variant with the measured GiB); tests/test_memory.py holds
the estimator to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# config.json of each shape. tiny_qwen2 is npu_recipes' demo model (npu_recipes/tiny_model.py);
# "mini" has Qwen2-7B's proportions (head_dim 128, GQA, intermediate ~5.3 x hidden) at a size a CPU
# trains in seconds, with a vocabulary large enough that logits matter as they do at 7B.
SHAPES = {
    "tiny_qwen2": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 716,
        "max_position_embeddings": 4096, "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    },
    "mini": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 512, "intermediate_size": 2688,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32768,
        "max_position_embeddings": 4096, "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "qwen2_7b": json.loads((REPO / "npu_recipes/model/configs/Qwen--Qwen2-7B-Instruct/config.json").read_text()),
}


def variants(shapes: list[str], device: str) -> list[dict]:
    """The measured grid: LoRA and full, two lengths, checkpointing on and off, accumulation 2."""
    grid = []
    for shape in shapes:
        dtypes = ["bfloat16"] if device != "cpu" else ["float32"]
        for dtype in dtypes:
            for train_type in ("lora", "full"):
                for max_length in (512, 2048):
                    for checkpointing in (True, False):
                        grid.append(dict(shape=shape, train_type=train_type, dtype=dtype, max_length=max_length,
                                         gradient_checkpointing=checkpointing, gradient_accumulation_steps=2))
        if device == "cpu" and shape == "mini":
            # bf16 through CPU autocast: the accelerators' dtype path, where a CPU can afford it.
            for train_type in ("lora", "full"):
                grid.append(dict(shape=shape, train_type=train_type, dtype="bfloat16", max_length=512,
                                 gradient_checkpointing=True, gradient_accumulation_steps=2))
    return grid


def _peak_from_profiler(prof) -> int:
    """Maximum of the running sum of the CPU allocator's allocations and frees seen by the profiler, bytes."""
    from torch.autograd import DeviceType

    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU),
        key=lambda e: e.start_ns(),
    )
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def measure(variant: dict, device_request: str, steps: int = 3) -> dict:
    """Run one variant in this process; return measured and estimated peaks (GiB)."""
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, default_data_collator

    from npu_recipes.config import compose
    from npu_recipes.model import pretrained
    from npu_recipes.plan import memory, targets
    from npu_recipes.runtime import devices
    from npu_recipes.train.arguments import training_arguments

    work = Path(tempfile.mkdtemp(prefix="memcal-"))
    (work / "model").mkdir()
    (work / "model" / "config.json").write_text(json.dumps(SHAPES[variant["shape"]]))
    config = compose.compose([
        "model=local", f"model.name_or_path={work / 'model'}", f"model.torch_dtype={variant['dtype']}",
        f"train_type={variant['train_type']}", f"device={device_request}", f"train.max_length={variant['max_length']}",
        f"train.gradient_checkpointing={str(variant['gradient_checkpointing']).lower()}",
        f"train.gradient_accumulation_steps={variant['gradient_accumulation_steps']}",
        f"train.max_steps={steps}", "train.logging_steps=1", "train.save_steps=1000000",
    ])
    device = devices.resolve(config.device)
    dtype = getattr(torch, variant["dtype"])

    torch.manual_seed(0)
    model_config = AutoConfig.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    model.config.use_cache = False
    if config.train_type == "lora":
        model = pretrained.apply_lora(model, config.lora)

    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, model_config.vocab_size, (variant["max_length"],), generator=generator).tolist()
            for _ in range(steps * variant["gradient_accumulation_steps"])]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows, "attention_mask": [[1] * len(r) for r in rows]})
    trainer = Trainer(
        model=model,
        args=training_arguments(config.train, config.parallelism, config.kernels, work / "run", device, dtype, has_eval=False,
                                gradient_checkpointing=config.train.gradient_checkpointing),
        train_dataset=dataset,
        data_collator=default_data_collator,
    )

    if device.module is not None:
        device.reset_peak_memory()
        trainer.train()
        measured = device.peak_memory_gib()
        method = "max_memory_allocated"
    else:
        from torch.profiler import ProfilerActivity, profile

        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer.train()
        measured = (sum(storages.values()) + _peak_from_profiler(prof)) / memory.GIB
        method = "torch profiler CPU allocator events + tensors alive at start"
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]

    target = targets.resolve("auto", device.type)
    shape = memory.model_shape(str(work / "model"), config.train_type, config.lora)
    estimate = memory.estimate(shape, memory.TrainSetting.from_sections(config.train_type, variant["dtype"], config.train, config.lora, config.parallelism), target)
    return {
        **variant,
        "micro_batch": config.train.per_device_train_batch_size,
        "optimizer_steps": steps,
        "measured_peak_gib": round(measured, 4),
        "measured_method": method,
        "rss_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / memory.GIB, 4),
        "losses": losses,
        # Printed beside the measurement, not stored: tests/test_memory.py recomputes it from today's code.
        "_estimate_gib": round(estimate.total_gib, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny_qwen2,mini", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "npu"))
    parser.add_argument("--out", default=str(REPO / "bench/results/memory_calibration_cpu.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(json.loads(args.one), args.device)), flush=True)
        return

    from npu_recipes.run import manifest
    from npu_recipes.runtime import devices

    shapes = args.shapes.split(",")
    records = []
    for variant in variants(shapes, args.device):
        result = subprocess.run(
            [sys.executable, __file__, "--device", args.device, "--one", json.dumps(variant)],
            capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode != 0 or not lines:
            sys.exit(f"variant {variant} failed:\n{result.stderr[-3000:]}")
        record = json.loads(lines[-1][len("RESULT "):])
        estimate = record.pop("_estimate_gib")
        records.append(record)
        print(f"{record['shape']:10s} {record['train_type']:4s} {record['dtype']:8s} {record['max_length']:5d} "
              f"ckpt={record['gradient_checkpointing']!s:5s} measured {record['measured_peak_gib']:8.4f} GiB  "
              f"estimate {estimate:8.4f} GiB  ({100 * (estimate / record['measured_peak_gib'] - 1):+.1f}%)",
              flush=True)
    device = devices.resolve(args.device)
    payload = {
        "description": "peak allocated memory of real Trainer steps (random-init models); tests/test_memory.py holds npu_recipes.plan.memory's estimate to it",
        "date": datetime.date.today().isoformat(),
        "device": device.name(),
        "versions": manifest.package_versions(),
        "shapes": {name: SHAPES[name] for name in shapes},
        "records": records,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from npu_recipes import atomic

    atomic.write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
