"""Side-by-side LoRA SFT throughput: plain transformers + PEFT against npu_recipes, one invocation.

    PYTHONPATH=. python bench/train_throughput.py                  # auto device; 600 samples
    PYTHONPATH=. python bench/train_throughput.py --samples 3000 --b-overrides train.gradient_checkpointing=false

Sides, all on the same machine, model and workload, one epoch each, each in its own process
(so CPU peak RSS and accelerator peak memory belong to one side):

  a  plain transformers Trainer + PEFT with the seed document's (swift's) defaults: micro-batch 1,
     gradient accumulation 16, no packing, gradient checkpointing on, LoRA r8/alpha32/dropout 0.05
     on all linear layers, AdamW (beta2 0.95, weight decay 0.1), cosine schedule.
  b  npu_recipes: ``+recipe=RECIPE`` (default qwen7b_lora_single) with its defaults (packing on),
     through :func:`npu_recipes.stages.train.fit`, the train stage's own code path.
  c  plain Trainer + PEFT with transformers' ``DataCollatorWithFlattening`` (padding-free), a
     micro-batch size that gives about as many tokens per micro-batch as b's packs, b's gradient
     accumulation, gradient checkpointing on.

Workload: ``--samples`` samples whose lengths follow blossom-math-v2's (mean about 175, max 563
tokens): a log-normal with sigma 0.5 and mean 180, redrawn above 563 and below 16 (which leaves a
mean of about 175), because the real histogram is not available offline. The first 30% of each
sample is a prompt (label -100). Token ids are drawn uniformly from the model's vocabulary without its special tokens. Model: a Qwen2-7B-shaped
model (random init, bf16, the anchor's config in ../shared/bench/hf_peft_step_anchor.py) on CUDA or
Ascend, the tiny_qwen2 model (fp32) on the CPU.

Reported per side: ``epoch_s`` (the Trainer's ``train_runtime``), non-padding tokens/s,
LoRA-MFU = 4 * N_matmul * tokens / epoch_s / peak (N_matmul: weights of every ``nn.Linear`` of the
base model, lm_head included, embeddings excluded; recompute and attention not counted; as in
../shared/bench/README.md), peak memory (accelerator: ``max_memory_allocated``; CPU: the side
process's peak RSS). The peak rate is 790 TFLOP/s on an H200 (the anchor's measured bf16 matmul
rate), otherwise measured here with a square matmul (bf16 on accelerators, fp32 on the CPU) and
labelled so. JSON goes to ``--output`` (default bench/results/train_throughput_<device type>.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# As npu_recipes/__init__.py does: an installed torch_npu must not load (and fail) inside `import torch`.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import torch

from npu_recipes import atomic
from npu_recipes.config.schema import DEVICES
from npu_recipes.data import packing
from npu_recipes.run import manifest, rundir
from npu_recipes.runtime import devices

KNOWN_PEAK_TFLOPS = {"NVIDIA H200": (790.0, "bf16 matmul rate measured on an H200 (../shared/bench/README.md)")}
"""Peak rates used for MFU instead of measuring, by device name."""

LENGTH_MEAN, LENGTH_SIGMA, LENGTH_MIN, LENGTH_MAX = 180.0, 0.5, 16, 563
"""Log-normal length model; redrawing outside [16, 563] brings the mean to about 175 (176.5 over 20,000 draws)."""
PROMPT_FRACTION = 0.3
TARGETS = {"cpu": 3.0, "cuda": 8.0, "npu": 8.0}
"""Least speed-up of side b over side a that issue 8 asks for, by device type."""


def sample_lengths(count: int, seed: int) -> list[int]:
    """``count`` token lengths, log-normal (sigma 0.5, mean 180), redrawn outside [16, 563] (mean about 175)."""
    generator = torch.Generator().manual_seed(seed)
    mu = math.log(LENGTH_MEAN) - LENGTH_SIGMA**2 / 2
    lengths: list[int] = []
    while len(lengths) < count:
        draws = torch.exp(mu + LENGTH_SIGMA * torch.randn(count, generator=generator, dtype=torch.float64))
        lengths += [int(round(x)) for x in draws.tolist() if LENGTH_MIN <= round(x) <= LENGTH_MAX]
    return lengths[:count]


def make_workload(count: int, seed: int, vocab_size: int, special_ids: list[int]) -> list[dict]:
    """Samples ``{"input_ids", "labels"}`` with random ids over the vocabulary minus special tokens."""
    generator = torch.Generator().manual_seed(seed + 1)
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(special_ids)))
    samples = []
    for length in sample_lengths(count, seed):
        ids = allowed[torch.randint(len(allowed), (length,), generator=generator)].tolist()
        prompt = max(1, int(PROMPT_FRACTION * length))
        samples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return samples


def qwen2_7b_config():
    """Qwen2-7B's architecture (as in ../shared/bench/hf_peft_step_anchor.py)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       rope_theta=1e6, tie_word_embeddings=False, rms_norm_eps=1e-6, dtype="bfloat16")


def tiny_model_dir() -> Path:
    """npu_recipes' tiny_qwen2 checkpoint (built on first use), whose tokenizer every side uses."""
    from npu_recipes.config import compose
    from npu_recipes.model import pretrained

    return Path(pretrained.resolve_path(compose.compose(["model=tiny_qwen2"]).model))


def prepare_model(kind: str, device: devices.Device, workdir: Path) -> Path:
    """The checkpoint all sides load: tiny_qwen2, or a random-init Qwen2-7B shape saved once in bf16."""
    tiny = tiny_model_dir()
    if kind == "tiny":
        return tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = workdir / "qwen2_7b_random"
    torch.manual_seed(0)
    with torch.device(device.torch_device()):
        model = AutoModelForCausalLM.from_config(qwen2_7b_config(), dtype=torch.bfloat16)
    model.save_pretrained(target)
    del model
    # Only the pad id and the chat template are used: the workload is token ids, never text.
    AutoTokenizer.from_pretrained(tiny).save_pretrained(target)
    return target


def matmul_n(model_dir: Path) -> int:
    """Weights of every ``nn.Linear`` of the model at ``model_dir`` (lm_head included even when tied,
    embeddings excluded), counted on the meta device without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def measure_peak_tflops(device: devices.Device) -> tuple[float, str]:
    """Peak matmul rate (TFLOP/s): the known figure for this chip, else a timed square matmul here."""
    name = device.name()
    if name in KNOWN_PEAK_TFLOPS:
        return KNOWN_PEAK_TFLOPS[name]
    size, dtype = (1024, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(size, size, dtype=dtype, device=device.torch_device())
    b = torch.randn(size, size, dtype=dtype, device=device.torch_device())
    best = float("inf")
    for _ in range(10):
        device.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        device.synchronize()
        best = min(best, (time.perf_counter() - start) / 5)
    kind = "fp32" if dtype == torch.float32 else "bf16"
    return 2 * size**3 / best / 1e12, f"measured here: best of 10 timings of a {size}x{size} {kind} matmul"


class Clock:
    """Wall and CPU seconds (all threads of this process) since creation: model load to trained."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"load_to_trained_wall_s": round(time.perf_counter() - self.wall, 2),
                "load_to_trained_cpu_s": round(time.process_time() - self.cpu, 2)}


def load_workload(workdir: Path):
    from datasets import Dataset

    samples = json.loads((workdir / "workload.json").read_text())
    return Dataset.from_list(samples), samples


def plain_side(side: str, args, device: devices.Device, workdir: Path) -> dict:
    """Sides a and c: transformers Trainer + PEFT as a user would write them, no npu_recipes code.

    Each saves one checkpoint at its last step, as side b does, so that save is inside every side's
    ``epoch_s`` (``train_runtime``) and the times compare like with like.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class SaveAtLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = state.global_step >= state.max_steps
            return control

    plan = json.loads((workdir / "plan.json").read_text())
    dataset, _ = load_workload(workdir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    clock = Clock()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    if side == "a":
        batch, accumulation = 1, 16
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    else:
        batch, accumulation = plan["c_batch_size"], plan["b_gradient_accumulation_steps"]
        collator = DataCollatorWithFlattening()
    training_args = TrainingArguments(
        output_dir=str(workdir / f"side_{side}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, num_train_epochs=1, learning_rate=1e-4, lr_scheduler_type="cosine",
        weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=dtype == torch.bfloat16, logging_steps=5,
        save_strategy="steps", save_steps=10**9, report_to=[], use_cpu=device.type == "cpu", seed=42, disable_tqdm=True,
    )
    device.reset_peak_memory()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer, callbacks=[SaveAtLastStep()])
    output = trainer.train()
    return {**clock.read(), "micro_batch_size": batch, "gradient_accumulation_steps": accumulation, "optimizer_steps": output.global_step,
            "epoch_s": output.metrics["train_runtime"], "loss": output.training_loss,
            "peak_memory_gib": device.peak_memory_gib()}


def recipe_overrides(args, device: devices.Device, workdir: Path) -> list[str]:
    return [f"+recipe={args.recipe}", "model=local", f"model.name_or_path={args.model_dir}", f"device={device.type}",
            "train.num_train_epochs=1", "train.max_steps=-1", "dataset.val_split_ratio=0",
            f"output_dir={workdir / 'side_b'}", *args.b_overrides]


def npu_recipes_side(args, device: devices.Device, workdir: Path) -> dict:
    """Side b: the recipe's resolved config through the train stage's ``fit`` (packing, Trainer, callbacks)."""
    from npu_recipes.config import compose
    from npu_recipes.data import sources, tokenize
    from npu_recipes.model import pretrained
    from npu_recipes.stages import train

    recipe = compose.compose(recipe_overrides(args, device, workdir))
    # Not the stage's prepare: that would tokenize the recipe's dataset, and this workload is generated token ids.
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path=pretrained.resolve_path(recipe.model)))
    run_dir, recipe = rundir.create(recipe, fresh_output_dir=True)
    dataset, samples = load_workload(workdir)
    tokens = sum(len(s["input_ids"]) for s in samples)
    counts = {"rows": len(samples), "held_out": 0, "train": len(samples), "validation": 0, "dropped_too_long": 0,
              "dropped_no_assistant_tokens": 0, "truncated": 0, "train_tokens": tokens}
    splits = tokenize.TokenizedSplits(train=dataset.add_column(sources.ROW_ID, list(range(len(dataset)))), eval=None,
                                      counts=counts, fingerprint=f"bench-workload-seed{args.seed}")
    tokenizer = pretrained.load_tokenizer(recipe.model, recipe.model.name_or_path)
    clock = Clock()
    output = train.fit(recipe, run_dir, device, tokenizer, splits)
    recorded = run_dir.read_manifest()
    checkpointing = recorded.gradient_checkpointing
    return {**clock.read(), "micro_batch_size": recipe.train.per_device_train_batch_size,
            "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
            "optimizer_steps": output.global_step, "epoch_s": output.metrics["train_runtime"],
            "loss": output.training_loss, "peak_memory_gib": device.peak_memory_gib(),
            "packing": dataclasses.asdict(recorded.packing) if recorded.packing else None,
            "gradient_checkpointing": checkpointing.enabled if checkpointing else recipe.train.gradient_checkpointing,
            "npu_recipes_reported": {"model_tflops": recorded.final_metrics.model_tflops, "mfu": recorded.final_metrics.mfu},
            "max_length": recipe.train.max_length, "overrides": recipe_overrides(args, device, workdir)}


def run_side(side: str, args) -> None:
    """Child process: run one side and write ``side_<side>.json`` in the work directory."""
    workdir = Path(args.workdir)
    device = devices.resolve(args.device)
    result = npu_recipes_side(args, device, workdir) if side == "b" else plain_side(side, args, device, workdir)
    atomic.write_json(workdir / f"side_{side}.json", result)


def plan_sides(args, device: devices.Device, workdir: Path, samples: list[dict]) -> dict:
    """b's packing of the workload (from its recipe's settings) and the matching micro-batch size for c."""
    from npu_recipes.config import compose

    recipe = compose.compose(recipe_overrides(args, device, workdir))
    lengths = [len(s["input_ids"]) for s in samples]
    packs = packing.plan_packs(lengths, recipe.train.max_length) if recipe.train.packing else [[i] for i in range(len(lengths))]
    tokens_per_micro_batch = sum(lengths) / len(packs) * recipe.train.per_device_train_batch_size
    return {
        "b_packing": recipe.train.packing, "b_packs": len(packs), "b_tokens_per_micro_batch": round(tokens_per_micro_batch, 1),
        "b_gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
        "c_batch_size": max(1, round(tokens_per_micro_batch / (sum(lengths) / len(lengths)))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=600, help="workload size (default 600)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--model", default="auto", choices=("auto", "tiny", "qwen2-7b"),
                        help="auto: qwen2-7b on an accelerator, tiny on the CPU")
    parser.add_argument("--recipe", default="qwen7b_lora_single", help="side b's recipe")
    parser.add_argument("--b-overrides", nargs="*", default=[], help="extra key=value overrides for side b")
    parser.add_argument("--sides", default="abc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch intra-op threads per side (default: torch's own choice); 1 on a shared, loaded CPU")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    if args.side:
        run_side(args.side, args)
        return

    device = devices.resolve(args.device)
    kind = args.model if args.model != "auto" else ("tiny" if device.type == "cpu" else "qwen2-7b")
    with tempfile.TemporaryDirectory(prefix="train_throughput-") as scratch:
        workdir = Path(scratch)
        model_dir = prepare_model(kind, device, workdir)
        from transformers import AutoConfig, AutoTokenizer

        vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        samples = make_workload(args.samples, args.seed, vocab_size, tokenizer.all_special_ids + [tokenizer.pad_token_id])
        (workdir / "workload.json").write_text(json.dumps(samples))
        plan = plan_sides(args, device, workdir, samples)
        (workdir / "plan.json").write_text(json.dumps(plan))
        peak_tflops, peak_source = measure_peak_tflops(device)
        if device.module is not None:
            device.module.empty_cache()  # leave the whole accelerator to the sides' processes

        lengths = [len(s["input_ids"]) for s in samples]
        tokens = sum(lengths)
        n_matmul = matmul_n(model_dir)
        sides = {}
        for side in args.sides:
            command = [sys.executable, __file__, "--side", side, "--workdir", str(workdir), "--model-dir", str(model_dir),
                       "--device", device.type, "--recipe", args.recipe, "--seed", str(args.seed),
                       *(["--cpu-threads", str(args.cpu_threads)] if args.cpu_threads else []),
                       "--b-overrides", *args.b_overrides]
            print(f"side {side}: running", flush=True)
            started = time.perf_counter()
            subprocess.run(command, check=True, cwd=REPO)
            result = json.loads((workdir / f"side_{side}.json").read_text())
            result["process_s"] = round(time.perf_counter() - started, 2)
            result["tokens_per_s"] = round(tokens / result["epoch_s"], 1)
            result["lora_mfu"] = round(4 * n_matmul * tokens / result["epoch_s"] / (peak_tflops * 1e12), 5)
            sides[side] = result
            print(f"side {side}: epoch {result['epoch_s']:.1f} s, {result['tokens_per_s']:,.0f} tokens/s, "
                  f"LoRA-MFU {100 * result['lora_mfu']:.2f}%, peak {result['peak_memory_gib']:.2f} GiB", flush=True)

    ratios = {}
    if "a" in sides and "b" in sides:
        ratios["b_speedup_over_a"] = round(sides["a"]["epoch_s"] / sides["b"]["epoch_s"], 3)
        ratios["b_peak_memory_over_a"] = round(sides["b"]["peak_memory_gib"] / sides["a"]["peak_memory_gib"], 3)
        ratios["b_cpu_time_speedup_over_a"] = round(
            sides["a"]["load_to_trained_cpu_s"] / sides["b"]["load_to_trained_cpu_s"], 3)
    if "c" in sides and "b" in sides:
        ratios["b_speedup_over_c"] = round(sides["c"]["epoch_s"] / sides["b"]["epoch_s"], 3)
    if "a" in sides and "c" in sides:
        ratios["c_speedup_over_a"] = round(sides["a"]["epoch_s"] / sides["c"]["epoch_s"], 3)
    report = {
        "benchmark": "bench/train_throughput.py",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": manifest.now(),
        "device": {"type": device.type, "name": device.name(), "count": device.count,
                   "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()},
        "versions": manifest.package_versions(),
        "git_commit": manifest.git_commit(),
        "model": {"kind": kind, "n_matmul": n_matmul,
                  "dtype": "float32" if device.type == "cpu" else "bfloat16"},
        "workload": {"samples": len(samples), "tokens": tokens, "mean_length": round(tokens / len(samples), 1),
                     "max_length": max(lengths), "min_length": min(lengths),
                     "labelled_tokens": sum(sum(1 for x in s["labels"] if x != -100) for s in samples),
                     "length_model": f"log-normal, sigma {LENGTH_SIGMA}, mean {LENGTH_MEAN} before redrawing outside "
                                     f"[{LENGTH_MIN}, {LENGTH_MAX}]; first {PROMPT_FRACTION:.0%} of each sample unlabelled",
                     "seed": args.seed},
        "plan": plan,
        "mfu_basis": {"peak_tflops": round(peak_tflops, 3), "source": peak_source,
                      "formula": "4 * n_matmul * tokens / epoch_s / peak (LoRA; recompute and attention excluded)"},
        "peak_memory_basis": "torch max_memory_allocated" if device.type != "cpu" else "peak RSS of the side's process",
        "sides": sides,
        "ratios": ratios,
        "target": {"b_speedup_over_a_at_least": TARGETS[device.type],
                   "met": ratios.get("b_speedup_over_a", 0) >= TARGETS[device.type]},
    }
    output = args.output or REPO / "bench" / "results" / f"train_throughput_{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(output, report)
    print(json.dumps(ratios), f"\nwritten: {output}", flush=True)


if __name__ == "__main__":
    main()
