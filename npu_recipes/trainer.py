"""``RecipeTrainer``: transformers ``Trainer`` with two documented override points filled in.

* ``floating_point_ops``: transformers sums it over batches into ``state.total_flos``; here it is the
  model-FLOPs formula of :mod:`npu_recipes.flops` (LoRA's frozen weights at 4·N, attention counted)
  instead of transformers' ``6 × parameters × tokens``.
* ``compute_loss``: hands each training loss to the :class:`~npu_recipes.nan_guard.NanGuard` (and
  lets it inject a NaN where ``nan_guard.inject_nan_at_steps`` asks for one).
* ``log``: lets the NaN guard add its count of skipped steps to every training log, before the
  log reaches ``log_history``, TensorBoard and logging.jsonl.
"""

from __future__ import annotations

from transformers import Trainer

from npu_recipes import flops
from npu_recipes.nan_guard import NanGuard


class RecipeTrainer(Trainer):
    """A ``Trainer`` that counts model FLOPs with ``flops_model`` and reports losses to ``nan_guard``."""

    def __init__(self, *args, flops_model: flops.FlopsModel, nan_guard: NanGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.flops_model = flops_model
        self.nan_guard = nan_guard

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
