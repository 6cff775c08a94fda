"""transformers ``TrainingArguments`` from the ``train.*`` section, plus what npu_recipes fixes for every run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from npu_recipes.config.schema import ParallelismConfig, TrainConfig
from npu_recipes.model import kernels
from npu_recipes.runtime import deepspeed_config
from npu_recipes.runtime.devices import Device
from npu_recipes.runtime.launch import DEEPSPEED_CONFIG

PASSED_THROUGH = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
    "logging_steps", "save_steps", "eval_steps", "save_total_limit", "seed", "dataloader_num_workers",
)
"""``train.*`` keys passed to ``TrainingArguments`` under the same name."""


def _accumulation_mismatch_under_deepspeed(record: logging.LogRecord) -> bool:
    """Drop accelerate's "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,
    DeepSpeed config has N" (a ``logging`` filter). The Trainer accumulates by itself and gives
    accelerate's plugin 1 on purpose, while DeepSpeed's config must hold the real count; accelerate
    then uses DeepSpeed's value, which is the intended one, and warns in every ZeRO run."""
    return not record.getMessage().startswith("Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,")


def training_arguments(train: TrainConfig, parallelism: ParallelismConfig, kernel_choice: str, run_dir: Path, device: Device,
                       dtype, has_eval: bool, gradient_checkpointing: bool):
    """Build ``TrainingArguments`` for a run writing ``run_dir`` on ``device`` with weights in ``dtype``.

    ``gradient_checkpointing`` is the decided setting (``auto`` resolved by the planner);
    ``kernel_choice`` is ``kernels`` (Liger is switched on here, see :func:`npu_recipes.model.kernels.training_arguments`).

    Create it before the model: with ZeRO-3 it registers the DeepSpeed config, so that
    ``from_pretrained`` loads weights already partitioned (``deepspeed.zero.Init``). ``use_cpu`` is
    set on the CPU also under DeepSpeed: without it accelerate finds no accelerator and every
    rank trains alone.
    """
    import torch
    from transformers import TrainingArguments

    if deepspeed_config.uses_deepspeed(parallelism):
        logging.getLogger("accelerate.accelerator").addFilter(_accumulation_mismatch_under_deepspeed)

    report_to = [] if train.report_to in ("none", "") else [name.strip() for name in train.report_to.split(",")]
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    return TrainingArguments(
        output_dir=str(run_dir),
        **{key: getattr(train, key) for key in PASSED_THROUGH},
        # transformers 5.24 renamed gradient_checkpointing*; the old names warn (FutureWarning) on every run.
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps" if has_eval else "no",
        save_strategy="steps",
        logging_first_step=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not device.is_accelerator,
        deepspeed=str(run_dir / DEEPSPEED_CONFIG) if deepspeed_config.uses_deepspeed(parallelism) else None,
        ddp_timeout=parallelism.ddp_timeout,
        ddp_find_unused_parameters=device.ddp_find_unused_parameters,
        average_tokens_across_devices=True,
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,
        report_to=report_to,
        **kernels.training_arguments(kernel_choice),
    )
