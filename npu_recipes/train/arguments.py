"""transformers ``TrainingArguments`` from the ``train.*`` section, plus what npu_recipes fixes for every run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from npu_recipes.config.schema import ParallelismConfig, TrainConfig
from npu_recipes.errors import UserError
from npu_recipes.model import kernels
from npu_recipes.runtime import deepspeed_config
from npu_recipes.runtime.devices import Device
from npu_recipes.runtime.launch import DEEPSPEED_CONFIG

log = logging.getLogger(__name__)

PASSED_THROUGH = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "logging_steps", "save_steps", "eval_steps", "seed", "dataloader_num_workers", "save_only_model",
    "metric_for_best_model", "greater_is_better",
)
"""``train.*`` keys passed to ``TrainingArguments`` under the same name (``optim`` too, after :func:`training_arguments`'s
check). ``save_total_limit`` is not: :class:`~npu_recipes.train.trainer.RecipeTrainer` applies it (sparing the newest
checkpoint, which transformers deletes at the end with a limit of 1 when the best is another)."""

FUSED_ADAMW = "adamw_torch_fused"
"""The default ``train.optim`` (transformers' own default since torch 2.8): one kernel for every
parameter, and it skips a step on device when told to (the NaN guard's ``found_inf``)."""


def _accumulation_mismatch_under_deepspeed(record: logging.LogRecord) -> bool:
    """Drop accelerate's "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,
    DeepSpeed config has N" (a ``logging`` filter). The Trainer accumulates by itself and gives
    accelerate's plugin 1 on purpose, while DeepSpeed's config must hold the real count; accelerate
    then uses DeepSpeed's value, which is the intended one, and warns in every ZeRO run."""
    return "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1," not in record.getMessage()


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

    if train.load_best_model_at_end and not has_eval:
        raise UserError(
            "train.load_best_model_at_end=true needs evaluations, but the length filter dropped every held-out row "
            f"(train.max_length={train.max_length})",
            fix="raise dataset.val_split_ratio or train.max_length, or pass train.load_best_model_at_end=false",
        )
    optim = train.optim
    if optim == FUSED_ADAMW and not device.runs_fused_adamw():
        optim = "adamw_torch"
        log.info("train.optim=%s: torch has no fused AdamW kernel for %s here; using adamw_torch (the same "
                 "algorithm, one kernel per tensor)", FUSED_ADAMW, device.type)
    if deepspeed_config.uses_deepspeed(parallelism):
        logging.getLogger("accelerate.accelerator").addFilter(_accumulation_mismatch_under_deepspeed)
    report_to = [] if train.report_to in ("none", "") else [name.strip() for name in train.report_to.split(",")]
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    return TrainingArguments(
        output_dir=str(run_dir),
        **{key: getattr(train, key) for key in PASSED_THROUGH},
        optim=optim,
        # transformers 5.24 renamed gradient_checkpointing*; the old names warn (FutureWarning) on every run.
        activation_checkpointing=gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps" if has_eval else "no",
        load_best_model_at_end=train.load_best_model_at_end,
        save_strategy="steps",
        logging_first_step=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not device.is_accelerator,
        deepspeed=str(run_dir / DEEPSPEED_CONFIG) if deepspeed_config.uses_deepspeed(parallelism) else None,
        ddp_timeout=parallelism.ddp_timeout,
        ddp_find_unused_parameters=device.ddp_find_unused_parameters,
        # From pinned memory (dataloader_pin_memory, on by default) a non-blocking copy queues behind the
        # running kernels; a blocking one waits for them to finish, once per micro-batch.
        accelerator_config={"non_blocking": device.is_accelerator},
        average_tokens_across_devices=True,
        # Counted from host-side sample lengths by RecipeTrainer: transformers' count reads a device
        # value per micro-batch, and its NaN/inf loss filter reads two, each a host synchronisation.
        include_num_input_tokens_seen="no",
        logging_nan_inf_filter=False,
        prediction_loss_only=True,
        report_to=report_to,
        **kernels.training_arguments(kernel_choice),
    )
