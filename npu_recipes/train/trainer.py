"""``RecipeTrainer``: transformers ``Trainer`` with two documented override points filled in.

* ``floating_point_ops``: transformers sums it over batches into ``state.total_flos``; here it is the
  model-FLOPs formula of :mod:`npu_recipes.model.flops` (LoRA's frozen weights at 4·N, attention counted)
  instead of transformers' ``6 × parameters × tokens``, from the host-side sample lengths the collator
  attached (:data:`~npu_recipes.data.packing.SAMPLE_LENGTHS`), which also count this rank's tokens:
  nothing in a step reads a device value for bookkeeping (transformers' own token count would, per
  micro-batch).
* ``compute_loss``: strips the sample lengths from the model's inputs and gives host-side sequence
  lengths the form the attention needs (:func:`npu_recipes.model.attention.forward_inputs`); hands each
  training loss to the :class:`~npu_recipes.train.nan_guard.NanGuard` (and lets it inject a NaN where
  ``nan_guard.inject_nan_at_steps`` asks for one).
* ``training_step``: the loss the Trainer accumulates for logging is 0 where it was not finite, decided on
  the device (transformers' ``logging_nan_inf_filter`` reads every loss on the host, so it is off).
* ``log``: adds the tokens of every rank since the previous log to ``state.num_input_tokens_seen`` (one
  int64 all-reduce, where logging synchronises anyway) and lets the NaN guard add its count of skipped
  steps, before the log reaches ``log_history``, TensorBoard and logging.jsonl.
* ``_save_checkpoint`` / ``_get_output_dir``: the Trainer's own checkpoint writer runs unchanged
  but inside a staging directory, which global rank 0 renames into place once every rank is done;
  then :func:`npu_recipes.run.checkpoints.rotate` applies ``save_total_limit`` sparing the newest and
  the best checkpoint (see :mod:`npu_recipes.run.checkpoints`).
  The best checkpoint (``train.metric_for_best_model``) is decided here, among the saved steps,
  and named in ``trainer_state.json`` (``best_model_checkpoint``, ``best_metric``, ``best_global_step``)
  and in the manifest; transformers' own choice may be a step that was evaluated but never saved,
  and it looks for it inside the staging directory.
* ``_load_from_checkpoint`` / ``_load_optimizer_and_scheduler``: a checkpoint that does not fit
  this model or optimizer (another LoRA rank, a full checkpoint for a LoRA run, damaged weights)
  is a :class:`~npu_recipes.errors.UserError` naming the checkpoint, not a traceback. With
  ``resume_weights_only`` the optimizer starts afresh and the learning-rate schedule is stepped to
  the checkpoint's step, so the rate continues where it was rather than restarting at its peak.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError
from transformers import Trainer

from npu_recipes.data.packing import SAMPLE_LENGTHS
from npu_recipes.errors import UserError
from npu_recipes.model import attention, flops
from npu_recipes.run import checkpoints, manifest
from npu_recipes.runtime import devices
from npu_recipes.train.nan_guard import NanGuard

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _loading(checkpoint: str, what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, ValueError, KeyError, SafetensorError) as error:
        if devices.is_out_of_memory(error):
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(
            f"cannot resume from {checkpoint}: its {what} do not fit this run ({type(error).__name__}: {first_line})",
            fix="resume from a checkpoint trained with this model and these train_type, lora and optimizer settings "
            "(see the resolved.yaml of its run), or start over with resume=never and a new output_dir",
        ) from None


class RecipeTrainer(Trainer):
    """A ``Trainer`` that counts model FLOPs with ``flops_model``, reports losses to ``nan_guard``,
    keeps ``save_total_limit`` checkpoints (sparing the newest and the best: transformers' own
    rotation is not given the limit) and, with ``weights_only_resume``, resumes weights alone."""

    def __init__(self, *args, flops_model: flops.FlopsModel, nan_guard: NanGuard, device: devices.Device,
                 cu_seq_lens: Optional[str] = None, save_total_limit: Optional[int] = None, weights_only_resume: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.flops_model = flops_model
        self.nan_guard = nan_guard
        self.device = device
        self.cu_seq_lens = cu_seq_lens
        self.save_total_limit = save_total_limit
        self.weights_only_resume = weights_only_resume
        self._checkpoint_staging: Optional[str] = None
        self._tokens_not_counted = 0

    def floating_point_ops(self, inputs) -> float:
        lengths = inputs[SAMPLE_LENGTHS]
        self._tokens_not_counted += sum(lengths)
        return self.flops_model.batch_flops(lengths)

    def _count_tokens(self) -> None:
        """Add every rank's tokens since the last count to ``state.num_input_tokens_seen`` (a collective)."""
        self.state.num_input_tokens_seen += self.device.sum_over_ranks(self._tokens_not_counted)
        self._tokens_not_counted = 0

    def _get_grad_norm(self, model, grad_norm=None):
        """transformers' gradient norm of this optimizer step (the clipping norm, before clipping), also
        handed to the NaN guard: computing its own would read every gradient a second time per step."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.nan_guard.observe_grad_norm(grad_norm)
        return grad_norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = attention.forward_inputs({k: v for k, v in inputs.items() if k != SAMPLE_LENGTHS}, self.cu_seq_lens)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        loss = result[0] if return_outputs else result
        loss = self.nan_guard.poison(loss, self.state.global_step + 1)
        self.nan_guard.observe_loss(loss)
        return (loss, result[1]) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # What the Trainer adds up for logging: 0 for a non-finite loss, decided on the device. (Its own
        # filter, logging_nan_inf_filter, reads the loss on the host; the NaN guard rescales the log.)
        return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))

    def log(self, logs, start_time=None):
        self._count_tokens()
        self.nan_guard.annotate(logs)
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        with _loading(resume_from_checkpoint, "weights"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is not None and self.weights_only_resume:
            self._continue_schedule(checkpoint)
            return
        with _loading(checkpoint, "optimizer and scheduler states"):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _continue_schedule(self, checkpoint) -> None:
        """Step the fresh learning-rate schedule to the resumed step (an evaluation-driven one has no position)."""
        from torch.optim.lr_scheduler import ReduceLROnPlateau

        log.warning("resume_weights_only: %s's weights and trainer state only; the optimizer starts afresh", checkpoint)
        if isinstance(self.lr_scheduler, ReduceLROnPlateau):
            return
        with warnings.catch_warnings():
            # torch warns about stepping a schedule before its optimizer: here that is the point.
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(self.state.global_step):
                self.lr_scheduler.step()

    def _get_output_dir(self, trial) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _best(self, run_dir: Path, step: int) -> Optional[manifest.BestCheckpointRecord]:
        """The best checkpoint among those saved in ``run_dir`` and ``step`` (being saved), by
        ``metric_for_best_model``; None before any of them was evaluated."""
        metric = self.args.metric_for_best_model or "eval_loss"
        greater = checkpoints.greater_is_better(metric, self.args.greater_is_better)
        saved = [checkpoints.step_of(path) for path in checkpoints.complete(run_dir)] + [step]
        best = checkpoints.best_evaluation(self.state.log_history, metric, greater, saved)
        if best is None:
            return None
        overall = checkpoints.best_evaluation(self.state.log_history, metric, greater)
        return manifest.BestCheckpointRecord(
            metric=checkpoints.metric_key(metric), greater_is_better=greater, checkpoint=str(run_dir / f"{checkpoints.PREFIX}{best[0]}"),
            step=best[0], value=best[1], best_evaluated_step=overall[0], best_evaluated_value=overall[1])

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        step = self.state.global_step
        self._count_tokens()  # trainer_state.json carries the count a resumed run continues from
        staging = checkpoints.staging_root(run_dir, step)
        best = self._best(run_dir, step)
        self._checkpoint_staging = str(staging)
        # transformers would name its best step's folder inside the staging directory; it is named below instead.
        self.state.best_global_step = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        if best is not None:
            self.state.best_model_checkpoint, self.state.best_metric, self.state.best_global_step = best.checkpoint, best.value, best.step
        if self.args.should_save:
            self.state.save_to_json(str(staging / f"{checkpoints.PREFIX}{step}" / checkpoints.TRAINER_STATE))
        # Every rank writes its own shards (DeepSpeed, RNG states) before the rename.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.publish(staging / f"{checkpoints.PREFIX}{step}", run_dir / f"{checkpoints.PREFIX}{step}")
            checkpoints.rotate(run_dir, self.save_total_limit, best.step if best else None, step)
            if best is not None:
                manifest.update(run_dir, best_checkpoint=best)
        self.accelerator.wait_for_everyone()
