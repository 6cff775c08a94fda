"""Train stage: supervised fine-tuning (LoRA or full) with transformers ``Trainer`` and PEFT.

Life cycle: :meth:`TrainStage.prepare` (resolve model and data, tokenize once, create or reopen the
run directory) runs once in the launching process; :meth:`TrainStage.run` (device, tokenizer, data,
model and Trainer; train; record) runs in every worker, where tokenization is read back from the HF
datasets cache that prepare filled, so no rank waits in a collective while another tokenizes. Loss
is the token-averaged cross-entropy over assistant tokens, averaged across gradient-accumulation
steps and devices by the Trainer (``num_items_in_batch``, ``average_tokens_across_devices``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
from typing import Optional

from npu_recipes.config.schema import RecipeConfig
from npu_recipes.data import messages, packing, sources, tokenize
from npu_recipes.errors import UserError, raise_terminated
from npu_recipes.model import attention, flops, kernels, pretrained
from npu_recipes.plan import planner
from npu_recipes.run import checkpoints, heldout, lost_peer, manifest, resume, shared_storage, summary
from npu_recipes.run.rundir import RunDir
from npu_recipes.runtime import deepspeed_config, devices, launch
from npu_recipes.stages import Prepared
from npu_recipes.train.arguments import training_arguments

log = logging.getLogger(__name__)


class TrainStage:
    in_launcher_only = False  # planned from parallelism.*: in this process, or torchrun workers

    def prepare(self, config: RecipeConfig, fresh_output_dir: bool) -> Prepared:
        """Resolve (build or download) model and dataset, tokenize into HF datasets' cache, then
        create the run directory or reopen the one to resume (:mod:`npu_recipes.run.resume`).

        Raises:
            UserError: bad data (before any run directory exists), an unusable output_dir, or a run
                that cannot be resumed with these settings.
            NothingToDo: ``output_dir`` holds a run that completed with these settings.
        """
        _terminate_with_a_record()
        pretrained.note_tiny_model(config.model, config.dataset.builder)
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, name_or_path=pretrained.resolve_path(config.model)),
            dataset=dataclasses.replace(config.dataset, path=sources.resolve_path(config.dataset)),
        )
        # Before the resume checks: a rerun compares the mapped dataset with the one its run recorded.
        config = dataclasses.replace(config, dataset=messages.known_layout(config.dataset, sources.local_columns(config.dataset)))
        pretrained.check_max_length(config.train.max_length, pretrained.fetch_config(config.model), config.model.name_or_path)
        resume.check_before_data(config, fresh_output_dir)  # a run that cannot start fails before tokenizing
        rows = tokenize.load_checked(config.dataset)  # bad files fail here, before the tokenizer loads torch
        splits = _tokenized(config, pretrained.load_tokenizer(config.model, config.model.name_or_path), rows)
        run_dir, config = resume.open_run_dir(config, fresh_output_dir, splits.counts)
        return Prepared(config, run_dir)

    def run(self, config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
        """Fine-tune ``config.model`` on ``config.dataset`` and record everything in ``run_dir``.

        Raises:
            UserError: bad data or model settings, a kernel or attention this device cannot run.
            RunStopped: the NaN guard stopped training (:mod:`npu_recipes.train.nan_guard`).
        """
        _terminate_with_a_record()
        device = devices.resolve(config.device)
        kernels.check(config.kernels, config.model.attn_implementation, device)
        kernels.check_optimizer(config.train.optim, device)
        if deepspeed_config.uses_deepspeed(config.parallelism):
            deepspeed_config.announce_op_builds()
        device.init_process_group(config.parallelism.ddp_timeout, deepspeed_config.uses_deepspeed(config.parallelism))
        node_rank, sightings = int(os.environ.get(launch.NODE_RANK_VARIABLE, "0")), []
        if _spans_nodes():
            sightings = shared_storage.check(run_dir.path, node_rank)
        device.seed(config.train.seed)
        tokenizer = pretrained.load_tokenizer(config.model, config.model.name_or_path)
        tokenizer.padding_side = "right"
        try:
            fit(config, run_dir, device, tokenizer, _tokenized(config, tokenizer, announce=False))
        except Exception as error:
            lost = lost_peer.lost_peer(error, devices.process_placement().rank, node_rank, sightings, run_dir.path) if sightings else None
            if lost is None:
                raise
            raise lost from None


STAGE = TrainStage()


def _spans_nodes() -> bool:
    """True in a torchrun worker whose job has processes on other nodes (torchrun's WORLD_SIZE > LOCAL_WORLD_SIZE):
    read from torchrun, not from resolved.yaml, so every rank agrees even if a node read another copy of it."""
    return int(os.environ.get("WORLD_SIZE", "1")) > int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def _batch_record(train, world_size: int) -> manifest.BatchRecord:
    micro, accumulation = train.per_device_train_batch_size, train.gradient_accumulation_steps
    return manifest.BatchRecord(micro, accumulation, world_size, micro * accumulation * world_size, train.global_batch_size is not None)


def _terminate_with_a_record() -> None:
    # SIGTERM outside training raises errors.Terminated, so the manifest says why the run ended
    # (during training StopOnSignal takes SIGTERM over and saves first).
    signal.signal(signal.SIGTERM, raise_terminated)


def _tokenized(config: RecipeConfig, tokenizer, rows=None, announce: bool = True) -> tokenize.TokenizedSplits:
    train = config.train
    return tokenize.prepare(config.dataset, tokenizer, train.max_length, train.truncation_strategy, train.seed, rows, announce)


def _plan_here(config: RecipeConfig, device: devices.Device, longest: int) -> planner.Plan:
    """The plan for this device, with rows of the ``longest`` tokens the training data actually has
    (``train.max_length`` is only the most it may have)."""
    train = dataclasses.replace(config.train, max_length=min(config.train.max_length, longest))
    return planner.for_device(model=config.model, train_type=config.train_type, lora=config.lora, train=train,
                              parallelism=config.parallelism, options=config.plan, device=device)


def _gradient_checkpointing(config: RecipeConfig, device: devices.Device, run_dir: Optional[RunDir], longest: int) -> bool:
    """``train.gradient_checkpointing`` decided: a boolean as given, ``auto`` by the planner for this
    device (logged, and recorded in the manifest when ``run_dir`` is given)."""
    if config.train.gradient_checkpointing != planner.AUTO:
        if run_dir is not None:
            run_dir.update_manifest(gradient_checkpointing=None)  # a resumed run may have decided under auto before
        return config.train.gradient_checkpointing
    decision = _plan_here(config, device, longest).checkpointing
    planner.log_decision(decision, device.name())
    if run_dir is not None:
        run_dir.update_manifest(gradient_checkpointing=manifest.CheckpointingRecord(
            setting=planner.AUTO, enabled=decision.enabled, without_checkpointing_gib=round(decision.without_checkpointing_gib, 3),
            usable_gib=round(decision.usable_gib, 3), margin=decision.margin))
    return decision.enabled


def fit(config: RecipeConfig, run_dir: RunDir, device: devices.Device, tokenizer, splits: tokenize.TokenizedSplits):
    """Train on already tokenized ``splits`` (packed when ``train.packing``) and record the run.

    :meth:`TrainStage.run` calls this after tokenizing; bench/train_throughput.py calls it with
    generated token ids, so the benchmark measures exactly this code path.

    Returns:
        transformers' ``TrainOutput`` (``global_step``, ``training_loss``, ``metrics``), or None when
        the checkpoint resumed from is already at ``train.max_steps``.
    """
    # Imported here, not above: they import transformers' Trainer, which a launcher that stops at bad input never needs.
    from npu_recipes.run import stopping
    from npu_recipes.train.callbacks import CurrentIntervals, JsonlLogger, SaveAndEvaluateAtEnd
    from npu_recipes.train.nan_guard import NanGuard
    from npu_recipes.train.trainer import RecipeTrainer

    placement = devices.process_placement()
    rank_zero = placement.rank == 0
    dtype, dtype_fallback = pretrained.dtype_choice(config.model, config.model.name_or_path, device)
    peak = flops.resolve_peak(config.mfu.peak_tflops, device.type, device.name(), dtype)
    chosen = attention.choose(config.model.attn_implementation, device.type, config.train.packing)
    log.info("attention: %s", chosen.reason)
    train_dataset, collator, packing_stats = packing.training_inputs(
        splits.train.remove_columns(sources.ROW_ID), tokenizer, packing=config.train.packing, max_length=config.train.max_length,
        cu_seq_lens=chosen.cu_seq_lens, ignore_index=messages.IGNORE_INDEX,
    )
    if rank_zero:
        run_dir.update_manifest(
            device=manifest.DeviceRecord(type=device.type, count=device.count, name=device.name(), dtype=str(dtype).replace("torch.", ""),
                                         world_size=placement.world_size, peak_tflops=peak.tflops, peak_source=peak.source,
                                         dtype_fallback=dtype_fallback),
            batch=_batch_record(config.train, placement.world_size),
            dataset=manifest.DatasetRecord(name=config.dataset.name, path=config.dataset.path, fingerprint=splits.fingerprint, **splits.counts),
            packing=None if packing_stats is None else manifest.PackingRecord(**packing_stats, attention=chosen.train_as),
            attention=manifest.AttentionRecord(requested=config.model.attn_implementation, loaded_as=chosen.load_as,
                                               trained_as=chosen.train_as, cu_seq_lens=chosen.cu_seq_lens, why=chosen.reason),
        )
        if splits.held_out_rows is not None:
            heldout.write(run_dir.path, splits.held_out_rows)
    longest = packing.longest_row(train_dataset)
    checkpointing = _gradient_checkpointing(config, device, run_dir if rank_zero else None, longest)
    # Before the model: under ZeRO-3 the arguments make from_pretrained load weights already partitioned.
    args = training_arguments(config.train, config.parallelism, config.kernels, run_dir.path, device, dtype,
                              has_eval=splits.eval is not None, gradient_checkpointing=checkpointing)
    model = pretrained.load_for_training(config.model, config.model.name_or_path, dtype,
                                         config.lora if config.train_type == "lora" else None, config.kernels, chosen.load_as,
                                         device.type)
    attention.adapt_model(model, chosen)
    device.reset_peak_memory()
    nan_guard = NanGuard(config.nan_guard, run_dir, deepspeed=deepspeed_config.uses_deepspeed(config.parallelism))
    stop = stopping.StopOnSignal(device, args.world_size, abort_on_repeat=args.world_size == 1, stop_timeout=config.parallelism.stop_timeout,
                                 on_timeout=functools.partial(stopping.abandon, run_dir, rank_zero, config.parallelism.stop_timeout))
    recorded = run_dir.read_manifest()
    trainer = RecipeTrainer(
        model=model, args=args, train_dataset=train_dataset, data_collator=collator, processing_class=tokenizer,
        eval_dataset=None if splits.eval is None else splits.eval.remove_columns(sources.ROW_ID),
        # The NaN guard cancels checkpoints that earlier callbacks ask for at a skipped step; a stop
        # on a signal comes after it, because that checkpoint is the only record of the steps since the last save.
        callbacks=[JsonlLogger(run_dir, device, peak, args.world_size), SaveAndEvaluateAtEnd(), CurrentIntervals(), nan_guard, stop],
        flops_model=flops.FlopsModel.from_model(model, model.config), nan_guard=nan_guard, device=device, cu_seq_lens=chosen.cu_seq_lens,
        save_total_limit=config.train.save_total_limit, weights_only_resume=recorded.resume_weights_only,
    )
    title = f"{config.recipe}: {config.model.name_or_path.split('/')[-1]}"
    resume_from = recorded.resume_from
    if resume_from:
        log.info("resuming from %s", resume_from)
        if 0 < config.train.max_steps <= (checkpoints.step_of(resume_from) or 0):
            # The Trainer would train one step past max_steps before checking it (a run killed after its last save).
            log.info("%s is at train.max_steps=%d: nothing left to train", resume_from, config.train.max_steps)
            if rank_zero:
                summary.finish(run_dir, title)
            return None
    stop.install()
    try:
        output = trainer.train(resume_from_checkpoint=resume_from)
    except Exception as error:
        if checkpoints.is_out_of_space(error, run_dir.path):
            raise checkpoints.out_of_space(run_dir.path, error, trainer.state.global_step) from None
        if devices.is_out_of_memory(error):
            raise _out_of_memory(config, device, error, trainer.state.global_step, longest) from None
        raise
    finally:
        stop.uninstall()
    nan_guard.raise_if_stopped(config.train.learning_rate)
    if stop.stopped_at_step is not None and trainer.state.global_step < trainer.state.max_steps:
        raise stopping.interrupted(run_dir, stop, trainer.is_world_process_zero())
    if trainer.is_world_process_zero():
        summary.finish(run_dir, title, loaded_best=config.train.load_best_model_at_end and trainer.state.best_model_checkpoint is not None)
    return output


def _out_of_memory(config: RecipeConfig, device: devices.Device, error: BaseException, step: int, longest: int) -> UserError:
    try:
        plan = _plan_here(config, device, longest)
    except UserError:
        plan = None
    return planner.out_of_memory(error, step, plan, config.parallelism.name)
