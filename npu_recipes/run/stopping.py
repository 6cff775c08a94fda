"""Stopping on SIGTERM or SIGINT with a checkpoint, instead of losing the steps since the last save.

A scheduler's SIGTERM (or Ctrl-C) only sets a flag here; at the end of the current optimizer step
the :class:`StopOnSignal` callback asks the Trainer to save and stop, and the train stage then
exits ``128 + signal`` (143 or 130). In a torchrun job every rank must save at the same step, since
saving is collective (DeepSpeed writes one shard per rank). The ranks agree without stalling the
device: at the end of step ``k`` each rank starts a non-blocking all-reduce (MAX) of its flag, copied
to pinned host memory behind an event; at the end of step ``k + 1`` it reads that result, which
every rank then holds, and all of them stop there. So a multi-process run stops one step after the
signal, and no step's end waits for the device to drain its queue (a blocking all-gather and
``.item()`` would, every step). A single process stops at the end of the step it is in.

torchrun's agent forwards SIGTERM/SIGINT to every worker and kills those still running after its
shutdown timeout (``parallelism.shutdown_timeout``), so a save must fit in that time.

The wait for the end of the step is bounded: when the step under way has not ended
``parallelism.stop_timeout`` seconds after the first signal (a step over a huge pack, a hung
collective), a timer thread abandons it (:func:`abandon`): the manifest says ``interrupted``
with the newest complete checkpoint, one error line says so, and the process exits ``128 +
signal`` at once, without saving the unfinished step. So a signal ends training within
``stop_timeout`` seconds, plus the save when the step ended in time. A second
Ctrl-C in a single process abandons the save (the partial checkpoint is never used, see
:mod:`npu_recipes.run.checkpoints`); a worker ignores repeats, because torchrun forwards a copy of
the first signal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Callable, Optional

from transformers import TrainerCallback

from npu_recipes import errors
from npu_recipes.errors import Interrupted
from npu_recipes.run import checkpoints, manifest
from npu_recipes.run.rundir import RunDir
from npu_recipes.runtime.devices import Device

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal(TrainerCallback):
    """Turn SIGTERM/SIGINT into "save a checkpoint at the end of this step, then stop training".

    Args:
        device: where the flag of the agreement over ranks lives (events and pinned memory on accelerators).
        world_size: processes in the job; 1 needs no agreement.
        abort_on_repeat: a second SIGINT raises ``KeyboardInterrupt`` (single process only).
        stop_timeout: seconds the step under way at the first signal may take to end (None: no bound).
        on_timeout: called from a timer thread with the signal and the unfinished step when it does not
            (:func:`abandon`); it must end the process.

    Attributes:
        signal_number: the first signal received, or None.
        stopped_at_step: the optimizer step at which training stopped for it, or None.
    """

    def __init__(self, device: Device, world_size: int, abort_on_repeat: bool, stop_timeout: Optional[float] = None,
                 on_timeout: Optional[Callable[[int, int], None]] = None):
        self.device = device
        self.world_size = world_size
        self.abort_on_repeat = abort_on_repeat
        self.signal_number: Optional[int] = None
        self.stopped_at_step: Optional[int] = None
        self._previous = {}
        self._in_flight = None
        self._host_flag = None
        self.stop_timeout = stop_timeout
        self._on_timeout = on_timeout
        self._deadline: Optional[threading.Timer] = None
        self._step_under_way = 1

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (call from the main thread)."""
        for number in SIGNALS:
            self._previous[number] = signal.signal(number, self._receive)

    def uninstall(self) -> None:
        """Give SIGTERM and SIGINT back to the handlers they had before :meth:`install`."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        self._disarm()

    def _arm(self) -> None:
        if self.stop_timeout is None or self._on_timeout is None:
            return
        self._deadline = threading.Timer(self.stop_timeout, self._on_timeout, (self.signal_number, self._step_under_way))
        self._deadline.daemon = True
        self._deadline.start()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_under_way = state.global_step + 1
        return control

    def _receive(self, number, frame) -> None:
        if self.signal_number is None:
            self.signal_number = number
            log.warning("%s received: saving a checkpoint at the end of this step, then stopping", signal.Signals(number).name)
            self._arm()
        elif self.abort_on_repeat and number == signal.SIGINT:
            raise KeyboardInterrupt

    def _start_agreement(self) -> None:
        """All-reduce (MAX) this rank's signal number without blocking the host; :meth:`_finish_agreement` reads it."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signal_number or 0], dtype=torch.int32, device=_local_device(self.device))
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if not self.device.is_accelerator:
            self._in_flight = (work, flag, None)
            return
        work.wait()  # orders the device's stream after the collective; the host goes on
        if self._host_flag is None:
            self._host_flag = _pinned_like(flag)
        self._host_flag.copy_(flag, non_blocking=True)
        event = self.device.module.Event()
        event.record()
        self._in_flight = (None, self._host_flag, event)

    def _finish_agreement(self) -> Optional[int]:
        """The signal any rank had seen when the previous agreement started, or None (waits only for that)."""
        if self._in_flight is None:
            return None
        work, value, event = self._in_flight
        self._in_flight = None
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        return int(value.tolist()[0]) or None

    def _agreed_signal(self) -> Optional[int]:
        if self.world_size == 1:
            return self.signal_number
        seen = self._finish_agreement()
        self._start_agreement()
        return seen

    def on_train_end(self, args, state, control, **kwargs):
        self._finish_agreement()  # every rank started the same collectives; none is left pending

    def on_step_end(self, args, state, control, **kwargs):
        number = self._agreed_signal()
        if number is not None and self.stopped_at_step is None:
            self.signal_number = self.signal_number or number
            self.stopped_at_step = state.global_step
            self._disarm()  # the step ended in time; the save is bounded by torchrun's shutdown timeout
            control.should_save = True
            control.should_training_stop = True
        return control


def _local_device(device: Device):
    """This process's ``torch.device`` (its local rank's) for a collective's tensor."""
    from npu_recipes.runtime.devices import process_placement

    return device.torch_device(process_placement().local_rank)


def _pinned_like(tensor):
    """A page-locked host tensor shaped like ``tensor`` (a plain one where pinning is unavailable, which
    only makes the copy into it synchronous)."""
    import torch

    try:
        return torch.empty_like(tensor, device="cpu", pin_memory=True)
    except RuntimeError:
        return torch.empty_like(tensor, device="cpu")


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


def abandon(run_dir: RunDir, records: bool, stop_timeout: float, signal_number: int, step: int) -> None:
    """End the process now, from :class:`StopOnSignal`'s timer thread, because training step ``step``
    had not ended ``stop_timeout`` seconds after ``signal_number``: record it in the manifest (when
    ``records``, i.e. on global rank 0), print one error naming the newest complete checkpoint and
    exit ``128 + signal_number`` without saving the unfinished step."""
    name = signal.Signals(signal_number).name
    saved = run_dir.checkpoints()
    newest = str(saved[-1]) if saved else None
    if records:
        try:
            run_dir.update_manifest(status=manifest.INTERRUPTED, finished_at=manifest.now(), stopped_at_step=step - 1,
                                    error=f"stopped by {name}: step {step} abandoned after parallelism.stop_timeout={stop_timeout:g} s",
                                    last_checkpoint=newest)
        except Exception as error:  # the exit must not wait on a broken disk
            log.warning("could not record the stop in the manifest: %s", error)
        # print_block ends the Trainer's progress bar first: it is live when this timer fires.
        errors.print_block(f"npu_recipes: error: stopped by {name}, but training step {step} did not end within "
                           f"parallelism.stop_timeout={stop_timeout:g} s: it was abandoned, unsaved; "
                           + (f"newest complete checkpoint: {newest}" if newest else "no checkpoint was saved")
                           + f"\n  fix: rerun the same command (with output_dir={run_dir.path}) to resume from "
                           + ("that checkpoint" if newest else "step 0") + "; raise parallelism.stop_timeout if a step takes longer")
    sys.stdout.flush()
    os._exit(128 + signal_number)
