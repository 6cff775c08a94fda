"""NaN guard: skip optimizer steps whose loss or gradient norm is not finite, stop after too many in a row.

bf16 training can overflow into inf/NaN (the seed's advice: ``--torch_dtype float32``). One bad
step would write NaN into every weight and every Adam moment; the guard skips that update, so the
weights and the optimizer state stay as they were. The step still counts toward ``max_steps``. No
checkpoint is saved at a skipped step, and after ``nan_guard.max_consecutive_bad_steps`` bad steps
in a row the run stops with a :class:`RunStopped` error that names the fixes.

Nothing here reads a device value inside a step on the default path:

* the decision is made on the device: ``skip = any rank's loss not finite or the gradient norm not
  finite`` (the norm the Trainer computes for clipping, after its all-reduce, handed over by
  :meth:`NanGuard.observe_grad_norm`, so the gradients are read once; the loss flag is all-reduced
  with MAX, a collective without a host read);
* an optimizer that takes torch's ``found_inf`` (fused Adam/AdamW/SGD: ``_step_supports_amp_scaling``,
  the protocol ``torch.amp.GradScaler`` uses) skips the update inside its kernel and leaves its step
  count as it was. Any other optimizer needs the flag on the host: one read per step, documented;
* the per-step flags are read back together where the Trainer synchronises anyway (logging, saving,
  evaluating, the end) or after ``max_consecutive_bad_steps`` unread steps, when the records are
  written and a streak stops the run.

Under DeepSpeed the engine steps inside the last micro-batch's backward, before any callback, and
skips a step with a non-finite gradient norm itself (bf16 ``check_grad_overflow``, fp32 and ZeRO-3
invalid-norm checks); the guard reads that decision (``step_was_skipped``, accelerate's view of
DeepSpeed's ``overflow``), records it and counts the streak. There the learning-rate schedule does
not advance on a skipped step (the Trainer holds it back); elsewhere it does.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from transformers import TrainerCallback

from npu_recipes.config.schema import NanGuardConfig
from npu_recipes.errors import RunStopped
from npu_recipes.run.manifest import finite_or_null
from npu_recipes.run.rundir import RunDir


class _Unread(NamedTuple):
    """One optimizer step's verdict, possibly still on the device: ``skipped`` and ``bad_loss`` are
    bool tensors or bools, ``grad_norm`` a float tensor or None."""

    step: int
    skipped: object
    bad_loss: object
    grad_norm: object


def _inner_optimizer(optimizer):
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


class NanGuard(TrainerCallback):
    """Watches each optimizer step's loss and gradient norm; skips the update when either is not finite.

    :meth:`observe_loss` is called with every training micro-batch's loss (see
    :class:`npu_recipes.train.trainer.RecipeTrainer`); :meth:`on_pre_optimizer_step` decides after the
    gradients are all-reduced and clipped, the same on every rank. Each skipped step appends a
    ``type: skipped_step`` record to logging.jsonl (world process zero only).

    Must come after every callback that may ask for a checkpoint, so that it can cancel the save.

    Args:
        config: ``nan_guard.*``.
        run_dir: where the records go.
        deepspeed: True when DeepSpeed steps the optimizer (it decides itself; the guard reads it).
    """

    def __init__(self, config: NanGuardConfig, run_dir: RunDir, deepspeed: bool = False):
        self.config = config
        self.run_dir = run_dir
        self.deepspeed = deepspeed
        self.skipped_steps = 0
        self.consecutive = 0
        self.bad_steps: List[int] = []
        self._bad_loss: Optional[torch.Tensor] = None
        self._grad_norm = None
        self._unread: List[_Unread] = []
        self._found_inf_set = False
        self._last_step_skipped = False
        self._steps_since_log = 0
        self._skipped_since_log = 0

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Fault injection (``nan_guard.inject_nan_at_steps``): NaN at those optimizer steps (1-based), else ``loss``."""
        return loss * float("nan") if step in self.config.inject_nan_at_steps else loss

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Remember, on the device, whether a micro-batch's training loss (a scalar tensor) was inf or NaN."""
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def observe_grad_norm(self, grad_norm) -> None:
        """This optimizer step's gradient norm before clipping, as the Trainer computed it (a device tensor,
        a float under DeepSpeed): see :meth:`npu_recipes.train.trainer.RecipeTrainer._get_grad_norm`."""
        self._grad_norm = grad_norm

    def _agreed_bad_loss(self, device: torch.device) -> torch.Tensor:
        flag = torch.zeros((), dtype=torch.int32, device=device) if self._bad_loss is None else self._bad_loss.to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.bool()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.deepspeed:
            return
        grad_norm = torch.as_tensor(self._grad_norm, device=args.device)
        self._grad_norm = None
        bad_loss = self._agreed_bad_loss(args.device)
        self._bad_loss = None
        skip = bad_loss | ~torch.isfinite(grad_norm)
        inner = _inner_optimizer(optimizer)
        if getattr(inner, "_step_supports_amp_scaling", False) and getattr(optimizer, "scaler", None) is None:
            # Read by torch's fused optimizers (as GradScaler sets it): skip on the device, no host read.
            inner.found_inf = skip.to(torch.float32)
            self._found_inf_set = True
        elif bool(skip):  # this optimizer cannot skip by itself: one host read per step
            for parameter in model.parameters():
                parameter.grad = None
        self._unread.append(_Unread(state.global_step + 1, skip, bad_loss, grad_norm))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._found_inf_set:
            del _inner_optimizer(optimizer).found_inf
            self._found_inf_set = False

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.deepspeed:
            bad_loss = self._bad_loss
            self._bad_loss = None
            self._unread.append(_Unread(state.global_step, bool(optimizer.step_was_skipped), bad_loss, None))
        synchronises_anyway = control.should_log or control.should_save or control.should_evaluate or control.should_training_stop
        if synchronises_anyway or len(self._unread) >= self.config.max_consecutive_bad_steps:
            self._read(state, control, args.device)
        if control.should_save and self._last_step_skipped:
            control.should_save = False
        return control

    def _read(self, state, control, device: torch.device) -> None:
        """Bring the unread verdicts to the host (one transfer), write their records, stop on a streak."""
        unread, self._unread = self._unread, []
        if not unread:
            return

        def on_device(value, missing: float) -> torch.Tensor:
            return torch.as_tensor(missing if value is None else value, dtype=torch.float32, device=device)

        values = torch.stack([torch.stack([on_device(u.skipped, 0.0), on_device(u.bad_loss, 0.0), on_device(u.grad_norm, float("nan"))])
                              for u in unread]).tolist()
        for entry, (skipped, bad_loss, grad_norm) in zip(unread, values):
            self._last_step_skipped = bool(skipped)
            self._steps_since_log += 1
            self._skipped_since_log += self._last_step_skipped
            if not skipped:
                self.consecutive = 0
                continue
            self.skipped_steps += 1
            self.consecutive += 1
            self.bad_steps.append(entry.step)
            if state.is_world_process_zero:
                self.run_dir.append_log({
                    "type": "skipped_step",
                    "step": entry.step,
                    "reason": "non-finite loss" if bad_loss else "non-finite grad norm",
                    "grad_norm": finite_or_null(grad_norm),
                    "consecutive": self.consecutive,
                    "skipped_steps": self.skipped_steps,
                })
            if self.consecutive >= self.config.max_consecutive_bad_steps:
                control.should_training_stop = True

    def annotate(self, logs: dict) -> None:
        """Add ``skipped_steps`` (so far) to a training log, and make its ``loss`` the mean over the steps
        since the previous log that were applied: NaN when every one was skipped, else the Trainer's
        mean (where a non-finite loss counted 0, see ``RecipeTrainer.training_step``) scaled by
        steps / applied steps (exact when every loss of a skipped step was non-finite, as when a NaN
        is injected)."""
        if "loss" not in logs:
            return
        steps, skipped = self._steps_since_log, self._skipped_since_log
        if steps and skipped == steps:
            logs["loss"] = float("nan")
        elif skipped:
            logs["loss"] = logs["loss"] * steps / (steps - skipped)
        logs["skipped_steps"] = self.skipped_steps
        self._steps_since_log = self._skipped_since_log = 0

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
