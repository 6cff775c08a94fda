"""Train stage: supervised fine-tuning (LoRA or full) with transformers ``Trainer`` and PEFT.

Life cycle: :func:`prepare` (resolve model and data, tokenize once, create the run directory) runs
once in the launching process; :func:`run` (set up tokenizer, data, model and Trainer; train; record
results) runs in every worker, where tokenization is read back from the HF datasets cache that
prepare filled, so no rank waits in a collective while another tokenizes. Loss is the token-averaged
cross-entropy over assistant tokens, averaged across gradient-accumulation steps and devices by the
Trainer (``num_items_in_batch``, ``average_tokens_across_devices``).
"""

from __future__ import annotations

import copy
import logging
import os
import signal
from typing import Optional

import torch

from npu_recipes import checkpoints, data, deepspeed_config, devices, flops, heldout, kernels, launch, models, packing, plots, resume, rundir
from npu_recipes.callbacks import CurrentIntervals, JsonlLogger, SaveAndEvaluateAtEnd
from npu_recipes.errors import Interrupted, UserError, raise_terminated
from npu_recipes.nan_guard import NanGuard
from npu_recipes.rundir import RunDir
from npu_recipes.schema import RecipeConfig
from npu_recipes.stopping import StopOnSignal
from npu_recipes.trainer import RecipeTrainer

log = logging.getLogger(__name__)

# train.* keys passed to TrainingArguments under the same name.
TRAINING_ARGUMENT_KEYS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "gradient_checkpointing",
    "logging_steps", "save_steps", "eval_steps", "save_total_limit", "seed", "dataloader_num_workers",
)


def prepare(config: RecipeConfig, fresh_output_dir: bool) -> RunDir:
    """Resolve (build or download) model and dataset once and tokenize the data into HF datasets'
    cache (so every worker reads it instead of tokenizing), then create the run directory, or
    reopen the one to resume (see :mod:`npu_recipes.resume`).

    Raises:
        UserError: bad data (before any run directory exists), an unusable output_dir, or a run
            that cannot be resumed with these settings.
        NothingToDo: ``output_dir`` holds a run that completed with these settings.
    """
    _terminate_with_a_record()
    config.model.name_or_path = models.resolve_path(config.model)
    config.dataset.path = data.resolve_path(config.dataset)
    splits = tokenized_splits(config, models.load_tokenizer(config.model, config.model.name_or_path))
    return resume.open_run_dir(config, fresh_output_dir, splits.counts)


def _terminate_with_a_record() -> None:
    # SIGTERM outside training raises errors.Terminated, so the manifest says why the run ended
    # (during training StopOnSignal takes SIGTERM over and saves first).
    signal.signal(signal.SIGTERM, raise_terminated)


def tokenized_splits(config: RecipeConfig, tokenizer) -> data.TokenizedSplits:
    """``config.dataset`` tokenized for training (cached by HF datasets under a fingerprint of the
    rows, tokenizer and settings; see :func:`npu_recipes.data.prepare`)."""
    return data.prepare(
        config.dataset, tokenizer, config.train.max_length, config.train.truncation_strategy, config.train.seed
    )


def training_arguments(config: RecipeConfig, run_dir: RunDir, device: devices.Device, dtype: torch.dtype, has_eval: bool):
    """Build ``TrainingArguments`` from ``config.train`` plus what npu_recipes fixes for every run.

    Create it before the model: with ZeRO-3 it registers the DeepSpeed config, so that
    ``from_pretrained`` loads weights already partitioned (``deepspeed.zero.Init``). ``use_cpu`` is
    set on the CPU also under DeepSpeed: without it accelerate finds no accelerator and every
    rank trains alone.
    """
    from transformers import TrainingArguments

    train = config.train
    report_to = [] if train.report_to in ("none", "") else [name.strip() for name in train.report_to.split(",")]
    if "tensorboard" in report_to:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir.path / "tensorboard")
    parallel = config.parallelism
    return TrainingArguments(
        output_dir=str(run_dir.path),
        **{key: getattr(train, key) for key in TRAINING_ARGUMENT_KEYS},
        gradient_checkpointing_kwargs={"use_reentrant": False},
        eval_strategy="steps" if has_eval else "no",
        save_strategy="steps",
        logging_first_step=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not device.is_accelerator,
        deepspeed=str(run_dir.path / launch.DEEPSPEED_CONFIG) if deepspeed_config.uses_deepspeed(parallel) else None,
        ddp_timeout=parallel.ddp_timeout,
        ddp_find_unused_parameters=device.ddp_find_unused_parameters,
        average_tokens_across_devices=True,
        include_num_input_tokens_seen="non_padding",
        prediction_loss_only=True,
        report_to=report_to,
        **kernels.training_arguments(config.kernels),
    )


def for_this_device(config: RecipeConfig, device: devices.Device) -> RecipeConfig:
    """A copy of ``config`` that the memory planner plans for ``device`` as it is: its type and, on an
    accelerator, its real memory (``plan.device_memory_gib``) rather than the recipe's target card."""
    planned_for = copy.deepcopy(config)
    planned_for.device = device.type
    if device.is_accelerator:
        planned_for.plan.device_memory_gib = device.total_memory_gib()
    return planned_for


def decide_gradient_checkpointing(config: RecipeConfig, device: devices.Device, run_dir: Optional[RunDir]) -> None:
    """Replace ``train.gradient_checkpointing=auto`` in ``config`` by the memory planner's decision for
    this device (its real memory on an accelerator, the host's RAM on the CPU; see
    :func:`npu_recipes.stages.plan.decide_checkpointing`), log it and, given ``run_dir``, record it
    in the manifest. A boolean setting is left as it is.
    """
    from npu_recipes.stages import plan

    if config.train.gradient_checkpointing != plan.AUTO:
        return
    planned = plan.make(for_this_device(config, device), [])
    enabled = planned.config.train.gradient_checkpointing
    config.train.gradient_checkpointing = enabled
    log.info(
        "gradient checkpointing auto: %s (estimate without it %.2f GiB x %.2f %s %.2f GiB usable on %s)",
        "on" if enabled else "off", planned.without_checkpointing_gib, plan.AUTO_CHECKPOINTING_MARGIN,
        ">" if enabled else "<=", planned.usable_gib, device.name(),
    )
    if run_dir is not None:
        run_dir.update_manifest(gradient_checkpointing={
            "setting": plan.AUTO, "enabled": enabled, "without_checkpointing_gib": round(planned.without_checkpointing_gib, 3),
            "usable_gib": round(planned.usable_gib, 3), "margin": plan.AUTO_CHECKPOINTING_MARGIN,
        })


def _numel(parameter: torch.nn.Parameter) -> int:
    # ZeRO-3 leaves an empty tensor in each process and records the full size as ds_numel.
    return getattr(parameter, "ds_numel", parameter.numel())


def build_model(config: RecipeConfig, dtype: torch.dtype):
    """Load the base model; wrap it with PEFT LoRA for ``train_type=lora``; apply ``kernels=npu``."""
    model = models.load_model(config.model, config.model.name_or_path, dtype)
    model.config.use_cache = False
    if config.train_type == "lora":
        model = models.apply_lora(model, config.lora)
    kernels.apply(config.kernels, model)
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    log.info("%s: %s trainable of %s parameters (%.3f%%)", config.train_type, f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def run(config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
    """Fine-tune ``config.model`` on ``config.dataset`` and record everything in ``run_dir``.

    Raises:
        UserError: bad data or model settings (see :func:`npu_recipes.data.prepare`), a kernel or
            attention implementation this device cannot run (:func:`npu_recipes.kernels.check`).
        RunStopped: the NaN guard stopped training (:mod:`npu_recipes.nan_guard`).
    """
    _terminate_with_a_record()
    device = devices.resolve(config.device)
    kernels.check(config.kernels, config.model.attn_implementation, device)
    device.init_process_group(config.parallelism.ddp_timeout, deepspeed_config.uses_deepspeed(config.parallelism))
    device.seed(config.train.seed)
    tokenizer = models.load_tokenizer(config.model, config.model.name_or_path)
    tokenizer.padding_side = "right"
    splits = tokenized_splits(config, tokenizer)
    fit(config, run_dir, device, tokenizer, splits)


def fit(config: RecipeConfig, run_dir: RunDir, device: devices.Device, tokenizer, splits: data.TokenizedSplits):
    """Train on already tokenized ``splits`` (packed when ``train.packing``) and record the run.

    :func:`run` calls this after tokenizing; bench/train_throughput.py calls it with generated
    token ids, so the benchmark measures exactly this code path.

    Returns:
        transformers' ``TrainOutput`` (``global_step``, ``training_loss``, ``metrics``), or None when
        the checkpoint resumed from is already at ``train.max_steps``.
    """
    placement = devices.process_placement()
    dtype = models.select_dtype(config.model, config.model.name_or_path, device)
    peak = flops.resolve_peak(config.mfu.peak_tflops, device.type, device.name(), dtype)
    train_dataset, collator, packing_stats = packing.training_inputs(
        splits.train.remove_columns(data.ROW_ID), tokenizer, packing=config.train.packing,
        max_length=config.train.max_length, attn_implementation=config.model.attn_implementation,
        ignore_index=data.IGNORE_INDEX,
    )
    if placement.rank == 0:
        run_dir.update_manifest(
            device={"type": device.type, "count": device.count, "name": device.name(), "dtype": str(dtype).replace("torch.", ""),
                    "world_size": placement.world_size, "peak_tflops": peak.tflops, "peak_source": peak.source},
            dataset={"name": config.dataset.name, "path": config.dataset.path, "fingerprint": splits.fingerprint, **splits.counts},
            packing=packing_stats,
        )
        if splits.held_out_rows is not None:
            heldout.write(run_dir.path, splits.held_out_rows)
    decide_gradient_checkpointing(config, device, run_dir if placement.rank == 0 else None)
    # Before the model: under ZeRO-3 the arguments make from_pretrained load weights already partitioned.
    args = training_arguments(config, run_dir, device, dtype, has_eval=splits.eval is not None)
    model = build_model(config, dtype)
    if packing_stats is not None:
        packing.adapt_model(model, config.model.attn_implementation)
    device.reset_peak_memory()
    nan_guard = NanGuard(config.nan_guard, run_dir)
    stop = StopOnSignal(device, args.world_size, abort_on_repeat=args.world_size == 1)
    trainer = RecipeTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=None if splits.eval is None else splits.eval.remove_columns(data.ROW_ID),
        data_collator=collator,
        processing_class=tokenizer,
        # The NaN guard cancels checkpoints that earlier callbacks ask for at a skipped step; a stop
        # on a signal comes after it, because that checkpoint is the only record of the steps since the last save.
        callbacks=[JsonlLogger(run_dir, device, peak, args.world_size), SaveAndEvaluateAtEnd(), CurrentIntervals(), nan_guard, stop],
        flops_model=flops.FlopsModel.from_model(model, model.config),
        nan_guard=nan_guard,
    )
    resume_from = run_dir.read_manifest().get("resume_from")
    if resume_from:
        log.info("resuming from %s", resume_from)
        if 0 < config.train.max_steps <= (checkpoints.step_of(resume_from) or 0):
            # The Trainer would train one step past max_steps before checking it (a run killed after its last save).
            log.info("%s is at train.max_steps=%d: nothing left to train", resume_from, config.train.max_steps)
            if placement.rank == 0:
                finish(config, run_dir)
            return None
    stop.install()
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
    except Exception as error:
        if checkpoints.is_out_of_space(error, run_dir.path):
            raise out_of_space(run_dir, error, trainer.state.global_step) from None
        if devices.is_out_of_memory(error):
            raise out_of_memory(for_this_device(config, device), error, trainer.state.global_step) from None
        raise
    finally:
        stop.uninstall()
    nan_guard.raise_if_stopped(config.train.learning_rate)
    if stop.stopped_at_step is not None and trainer.state.global_step < trainer.state.max_steps:
        raise interrupted(run_dir, stop, trainer.is_world_process_zero())
    if trainer.is_world_process_zero():
        finish(config, run_dir)
    return output


def out_of_space(run_dir: RunDir, error: Exception, step: int) -> UserError:
    """The error for a full disk (or quota) during training: unfinished saves are deleted, to free
    their space, and the message names the newest complete checkpoint, from which a rerun resumes."""
    checkpoints.remove_partials(run_dir.path)
    found = run_dir.checkpoints()
    if isinstance(error, OSError) and error.strerror:
        reason = f"{error.strerror}: {error.filename or 'while saving'}"
    else:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return UserError(
        f"no space left on the device holding {run_dir.path} at step {step} "
        f"({reason}); the unfinished save was deleted; "
        + (f"newest complete checkpoint: {found[-1]}" if found else "no complete checkpoint was saved"),
        fix=f"free space there (df -h {run_dir.path}) or lower train.save_total_limit, then rerun the same command "
        "(resume=auto continues from the newest complete checkpoint)",
    )


def out_of_memory(config: RecipeConfig, error: Exception, step: int) -> UserError:
    """The error for a device out-of-memory failure, naming the plan stage's next option that fits
    ``config`` (planned for the device that failed, see :func:`for_this_device`;
    :func:`npu_recipes.stages.plan.after_out_of_memory`)."""
    from npu_recipes.stages import plan

    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        suggestion = plan.after_out_of_memory(config)
    except UserError:
        suggestion = None
    advice = (
        f"the plan stage's next option that fits: {' '.join(suggestion.overrides)} ({suggestion.why}; "
        f"estimated {suggestion.total_gib} GiB per device)"
        if suggestion else "the plan stage finds no smaller option on this device"
    )
    if suggestion and not all(resume.may_change(override.split("=")[0]) for override in suggestion.overrides):
        advice += " in a new output_dir (this run's checkpoints resume only with the settings that saved them)"
    return UserError(
        f"device out of memory at training step {step + 1}: {first_line}",
        fix=f"{advice}; see every estimate with the same command plus stage=plan",
    )


def interrupted(run_dir: RunDir, stop: StopOnSignal, records: bool) -> Interrupted:
    """Record (when ``records``, i.e. on global rank 0) that a signal stopped the run at a saved step;
    return the :class:`Interrupted` to raise."""
    name = signal.Signals(stop.signal_number).name
    saved = [path for path in run_dir.checkpoints() if checkpoints.step_of(path) == stop.stopped_at_step]
    checkpoint = str(saved[0]) if saved else None
    if records:
        run_dir.update_manifest(status="interrupted", finished_at=rundir.now(), stopped_at_step=stop.stopped_at_step,
                                error=f"stopped by {name}", last_checkpoint=checkpoint)
    where = f"saved {checkpoint}" if checkpoint else "no checkpoint could be saved"
    return Interrupted(
        f"stopped by {name} at step {stop.stopped_at_step}; {where}. Rerun the same command "
        f"(with output_dir={run_dir.path}) to resume",
        stop.signal_number, checkpoint,
    )


def _rounded(loss: Optional[float]) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def finish(config: RecipeConfig, run_dir: RunDir) -> None:
    """Draw loss.png, write final metrics into the manifest and print where everything is."""
    records = run_dir.read_log()
    plots.draw_loss(records, run_dir.path / rundir.LOSS_PLOT, title=f"{config.recipe}: {config.model.name_or_path.split('/')[-1]}")
    train_records = [r for r in records if r.get("type") == "train"]
    eval_records = [r for r in records if r.get("type") == "eval"]
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), {})
    checkpoints = run_dir.checkpoints()
    metrics = {
        "steps": summary.get("step", train_records[-1]["step"] if train_records else 0),
        "first_loss": train_records[0]["loss"] if train_records else None,
        "last_loss": train_records[-1]["loss"] if train_records else None,
        "last_eval_loss": eval_records[-1]["eval_loss"] if eval_records else None,
        "train_runtime_s": summary.get("train_runtime"),
        "num_input_tokens_seen": summary.get("num_input_tokens_seen"),
        "peak_memory_gib": summary.get("peak_memory_gib"),
        "model_tflops": summary.get("model_tflops"),
        "mfu": summary.get("mfu"),
        "skipped_steps": sum(1 for r in records if r.get("type") == "skipped_step"),
        "last_checkpoint": str(checkpoints[-1]) if checkpoints else None,
    }
    run_dir.update_manifest(status="completed", finished_at=rundir.now(), final_metrics=metrics)
    print(
        f"\nrun directory: {run_dir.path}\n"
        f"checkpoint:    {metrics['last_checkpoint']}\n"
        f"loss:          first {_rounded(metrics['first_loss'])} -> last {_rounded(metrics['last_loss'])}"
        + (f" (eval {metrics['last_eval_loss']:.4f})" if metrics["last_eval_loss"] is not None else "")
        + f"\nthroughput:    {metrics['model_tflops']} model TFLOP/s per device, MFU "
        + (f"{100 * metrics['mfu']:.1f}%" if metrics["mfu"] is not None else "n/a (no peak: see docs/mfu.md)")
        + (f"\nskipped steps: {metrics['skipped_steps']} (non-finite loss or grad norm)" if metrics["skipped_steps"] else ""),
        flush=True,
    )
