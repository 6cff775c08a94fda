"""``RecipeTrainer``: transformers ``Trainer`` with two documented override points filled in.

* ``floating_point_ops``: transformers sums it over batches into ``state.total_flos``; here it is the
  model-FLOPs formula of :mod:`npu_recipes.model.flops` (LoRA's frozen weights at 4·N, attention counted)
  instead of transformers' ``6 × parameters × tokens``.
* ``compute_loss``: hands each training loss to the :class:`~npu_recipes.train.nan_guard.NanGuard` (and
  lets it inject a NaN where ``nan_guard.inject_nan_at_steps`` asks for one).
* ``log``: lets the NaN guard add its count of skipped steps to every training log, before the
  log reaches ``log_history``, TensorBoard and logging.jsonl.
* ``_save_checkpoint`` / ``_get_output_dir``: the Trainer's own checkpoint writer runs unchanged
  but inside a staging directory, which global rank 0 renames into place once every rank is done;
  then :func:`npu_recipes.run.checkpoints.rotate` applies ``save_total_limit`` sparing the newest and
  the best checkpoint (see :mod:`npu_recipes.run.checkpoints`).
* ``_load_from_checkpoint`` / ``_load_optimizer_and_scheduler``: a checkpoint that does not fit
  this model or optimizer (another LoRA rank, a full checkpoint for a LoRA run, damaged weights)
  is a :class:`~npu_recipes.errors.UserError` naming the checkpoint, not a traceback.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

from safetensors import SafetensorError
from transformers import Trainer

from npu_recipes.errors import UserError
from npu_recipes.model import flops
from npu_recipes.run import checkpoints
from npu_recipes.runtime import devices
from npu_recipes.train.nan_guard import NanGuard


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
    """A ``Trainer`` that counts model FLOPs with ``flops_model`` and reports losses to ``nan_guard``."""

    def __init__(self, *args, flops_model: flops.FlopsModel, nan_guard: NanGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.flops_model = flops_model
        self.nan_guard = nan_guard
        self._checkpoint_staging: Optional[str] = None

    def floating_point_ops(self, inputs) -> float:
        return flops.batch_flops_from_inputs(self.flops_model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        loss = result[0] if return_outputs else result
        loss = self.nan_guard.poison(loss, self.state.global_step + 1)
        self.nan_guard.observe_loss(loss)
        return (loss, result[1]) if return_outputs else loss

    def log(self, logs, start_time=None):
        self.nan_guard.annotate(logs)
        super().log(logs, start_time)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        with _loading(resume_from_checkpoint, "weights"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        with _loading(checkpoint, "optimizer and scheduler states"):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _get_output_dir(self, trial) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        step = self.state.global_step
        staging = checkpoints.staging_root(run_dir, step)
        self._checkpoint_staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        # Every rank writes its own shards (DeepSpeed, RNG states) before the rename.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.publish(staging / f"{checkpoints.PREFIX}{step}", run_dir / f"{checkpoints.PREFIX}{step}")
            saved = [checkpoints.step_of(path) for path in checkpoints.complete(run_dir)]
            checkpoints.rotate(run_dir, self.args.save_total_limit, checkpoints.best_step(self.state.log_history, saved), step)
        self.accelerator.wait_for_everyone()
