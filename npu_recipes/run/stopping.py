"""Stopping on SIGTERM or SIGINT with a checkpoint, instead of losing the steps since the last save.

A scheduler's SIGTERM (or Ctrl-C) only sets a flag here; at the end of the current optimizer step
the :class:`StopOnSignal` callback asks the Trainer to save and stop, and the train stage then
exits ``128 + signal`` (143 or 130). In a torchrun job every rank must save at the same step, since
saving is collective (DeepSpeed writes one shard per rank); the ranks agree with one all-gather of
the flag per step, and the first step at which any rank saw a signal is where all of them stop.

torchrun's agent forwards SIGTERM/SIGINT to every worker and kills those still running after its
shutdown timeout (``parallelism.shutdown_timeout``), so a save must fit in that time. A second
Ctrl-C in a single process abandons the save (the partial checkpoint is never used, see
:mod:`npu_recipes.run.checkpoints`); a worker ignores repeats, because torchrun forwards a copy of
the first signal.
"""

from __future__ import annotations

import logging
import signal
from typing import Optional

from transformers import TrainerCallback

from npu_recipes.errors import Interrupted
from npu_recipes.run import checkpoints, manifest
from npu_recipes.run.rundir import RunDir
from npu_recipes.runtime.devices import Device

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(TrainerCallback):
    """Turn SIGTERM/SIGINT into "save a checkpoint at the end of this step, then stop training".

    Args:
        device: for agreeing on the flag over ranks (:meth:`Device.gather_over_ranks`).
        world_size: processes in the job; 1 needs no agreement.
        abort_on_repeat: a second SIGINT raises ``KeyboardInterrupt`` (single process only).

    Attributes:
        signal_number: the first signal received, or None.
        stopped_at_step: the optimizer step at which training stopped for it, or None.
    """

    def __init__(self, device: Device, world_size: int, abort_on_repeat: bool):
        self.device = device
        self.world_size = world_size
        self.abort_on_repeat = abort_on_repeat
        self.signal_number: Optional[int] = None
        self.stopped_at_step: Optional[int] = None
        self._previous = {}

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (call from the main thread)."""
        for number in SIGNALS:
            self._previous[number] = signal.signal(number, self._receive)

    def uninstall(self) -> None:
        """Give SIGTERM and SIGINT back to the handlers they had before :meth:`install`."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _receive(self, number, frame) -> None:
        if self.signal_number is None:
            self.signal_number = number
            log.warning("%s received: saving a checkpoint at the end of this step, then stopping", signal.Signals(number).name)
        elif self.abort_on_repeat and number == signal.SIGINT:
            raise KeyboardInterrupt

    def _agreed_signal(self) -> Optional[int]:
        if self.world_size == 1:
            return self.signal_number
        seen = max(self.device.gather_over_ranks(float(self.signal_number or 0)))
        return int(seen) or None

    def on_step_end(self, args, state, control, **kwargs):
        number = self._agreed_signal()
        if number is not None and self.stopped_at_step is None:
            self.signal_number = self.signal_number or number
            self.stopped_at_step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


def interrupted(run_dir: RunDir, stop: StopOnSignal, records: bool) -> Interrupted:
    """Record (when ``records``, i.e. on global rank 0) that a signal stopped the run at a saved step;
    return the :class:`Interrupted` to raise."""
    name = signal.Signals(stop.signal_number).name
    saved = [path for path in run_dir.checkpoints() if checkpoints.step_of(path) == stop.stopped_at_step]
    checkpoint = str(saved[0]) if saved else None
    if records:
        run_dir.update_manifest(status=manifest.INTERRUPTED, finished_at=manifest.now(), stopped_at_step=stop.stopped_at_step,
                                error=f"stopped by {name}", last_checkpoint=checkpoint)
    where = f"saved {checkpoint}" if checkpoint else "no checkpoint could be saved"
    return Interrupted(
        f"stopped by {name} at step {stop.stopped_at_step}; {where}. Rerun the same command "
        f"(with output_dir={run_dir.path}) to resume",
        stop.signal_number, checkpoint,
    )
