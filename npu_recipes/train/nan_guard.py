"""NaN guard: skip optimizer steps whose loss or gradient norm is not finite, stop after too many in a row.

bf16 training can overflow into inf/NaN (the seed's advice: ``--torch_dtype float32``). One bad
step would write NaN into every weight and every Adam moment; the guard drops that step's gradients
instead, so ``optimizer.step()`` leaves the weights and the optimizer state untouched (torch's
optimizers skip parameters whose ``.grad`` is None). The learning-rate schedule still advances,
and the step still counts toward ``max_steps``. No checkpoint is saved at a skipped step, and after
``nan_guard.max_consecutive_bad_steps`` bad steps in a row the run stops with a :class:`RunStopped`
error that names the fixes.
"""

from __future__ import annotations

import math
from typing import List

import torch
from transformers import TrainerCallback

from npu_recipes.config.schema import NanGuardConfig
from npu_recipes.errors import RunStopped
from npu_recipes.run.manifest import finite_or_null
from npu_recipes.run.rundir import RunDir


class NanGuard(TrainerCallback):
    """Watches each optimizer step's loss and gradient norm; drops the update when either is not finite.

    :meth:`observe_loss` is called with every training micro-batch's loss (see
    :class:`npu_recipes.train.trainer.RecipeTrainer`); :meth:`on_pre_optimizer_step` decides after the
    gradients are all-reduced and clipped, so every rank makes the same decision. Each skipped step
    appends a ``type: skipped_step`` record to logging.jsonl (world process zero only).

    Must come after every callback that may ask for a checkpoint, so that it can cancel the save.
    """

    def __init__(self, config: NanGuardConfig, run_dir: RunDir):
        self.config = config
        self.run_dir = run_dir
        self.skipped_steps = 0
        self.consecutive = 0
        self.bad_steps: List[int] = []
        self._bad_loss = False
        self._last_step_skipped = False
        self._steps_since_log = 0
        self._skipped_since_log = 0

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Fault injection (``nan_guard.inject_nan_at_steps``): NaN at those optimizer steps (1-based), else ``loss``."""
        return loss * float("nan") if step in self.config.inject_nan_at_steps else loss

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Remember whether a micro-batch's training loss (a scalar tensor) was inf or NaN."""
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = True

    def _any_rank_had_bad_loss(self, device: torch.device) -> bool:
        flag = torch.tensor(float(self._bad_loss), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norms = [torch.linalg.vector_norm(p.grad).float() for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        bad_loss = self._any_rank_had_bad_loss(args.device)
        self._bad_loss = False
        self._last_step_skipped = bad_loss or not math.isfinite(grad_norm)
        self._steps_since_log += 1
        self._skipped_since_log += self._last_step_skipped
        if not self._last_step_skipped:
            self.consecutive = 0
            return
        for parameter in model.parameters():
            parameter.grad = None
        step = state.global_step + 1
        self.skipped_steps += 1
        self.consecutive += 1
        self.bad_steps.append(step)
        if state.is_world_process_zero:
            self.run_dir.append_log({
                "type": "skipped_step",
                "step": step,
                "reason": "non-finite loss" if bad_loss else "non-finite grad norm",
                "grad_norm": finite_or_null(grad_norm),
                "consecutive": self.consecutive,
                "skipped_steps": self.skipped_steps,
            })
        if self.consecutive >= self.config.max_consecutive_bad_steps:
            control.should_training_stop = True

    def annotate(self, logs: dict) -> None:
        """Add ``skipped_steps`` (so far) to a training log, and make its ``loss`` NaN when every step
        since the previous log was skipped (transformers would log a stand-in average, 0 for a one-step window)."""
        if "loss" not in logs:
            return
        if self._steps_since_log and self._skipped_since_log == self._steps_since_log:
            logs["loss"] = float("nan")
        logs["skipped_steps"] = self.skipped_steps
        self._steps_since_log = self._skipped_since_log = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self._last_step_skipped:
            control.should_save = False
        return control

    def raise_if_stopped(self, learning_rate: float) -> None:
        """Raise :class:`RunStopped` when the guard stopped training.

        Raises:
            RunStopped: ``max_consecutive_bad_steps`` steps in a row had a non-finite loss or gradient norm.
        """
        if self.consecutive < self.config.max_consecutive_bad_steps:
            return
        streak = self.bad_steps[-self.consecutive:]
        raise RunStopped(
            f"training stopped: {self.consecutive} optimizer steps in a row (steps {streak[0]}-{streak[-1]}) had a "
            f"non-finite loss or gradient norm; their updates were skipped and no checkpoint was saved for them",
            fix=f"train in full precision with model.torch_dtype=float32, or lower the learning rate "
            f"(now train.learning_rate={learning_rate:g}); logging.jsonl lists the skipped steps",
        )
