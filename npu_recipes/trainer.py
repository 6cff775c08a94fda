"""``RecipeTrainer``: transformers ``Trainer`` with two documented override points filled in.

* ``floating_point_ops``: transformers sums it over batches into ``state.total_flos``; here it is the
  model-FLOPs formula of :mod:`npu_recipes.flops` (LoRA's frozen weights at 4·N, attention counted)
  instead of transformers' ``6 × parameters × tokens``.
* ``compute_loss``: hands each training loss to the :class:`~npu_recipes.nan_guard.NanGuard` (and
  lets it inject a NaN where ``nan_guard.inject_nan_at_steps`` asks for one).
* ``log``: lets the NaN guard add its count of skipped steps to every training log, before the
  log reaches ``log_history``, TensorBoard and logging.jsonl.
* ``_save_checkpoint`` / ``_get_output_dir``: the Trainer's own checkpoint writer runs unchanged
  but inside a staging directory, which global rank 0 renames into place once every rank is done;
  then :func:`npu_recipes.checkpoints.rotate` applies ``save_total_limit`` sparing the newest and
  the best checkpoint (see :mod:`npu_recipes.checkpoints`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from transformers import Trainer

from npu_recipes import checkpoints, flops
from npu_recipes.nan_guard import NanGuard


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
            checkpoints.rotate(run_dir, self.args.save_total_limit, checkpoints.best_step(self.state.log_history, saved))
        self.accelerator.wait_for_everyone()
