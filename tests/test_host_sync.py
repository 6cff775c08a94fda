"""No host synchronisation inside a training step on the default path.

Method: every Tensor method that hands a tensor's value to Python (``item``, ``tolist``, ``__bool__``,
``__float__``, ``__int__``, ``__index__``, ``numpy``, ``cpu``) is wrapped, and calls on tensors on the
model's device are counted between the Trainer's ``on_step_begin`` and ``on_step_end`` callbacks of
steps that neither log, save, evaluate nor end the run (those synchronise by design). On an
accelerator each such call waits for the device's queue to drain; on the CPU, the device here, every
tensor is on the model's device, so the count is stricter than an accelerator needs. On CUDA the
device check (bench/device_check.sh) runs the same steps under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import collections
import traceback
import warnings

import pytest
import torch
from transformers import TrainerCallback

from npu_recipes.train import trainer as trainer_module
from tests.helpers import run_in_process

pytestmark = pytest.mark.slow

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
STEPS = 5
"""Steps 2 to 4 are counted: step 1 logs (logging_first_step) and step 5 saves and ends the run."""


class HostReads:
    """Counts value reads by call site while :attr:`active`, in ``sites[phase]``."""

    def __init__(self, monkeypatch):
        self.active = False
        self.phase = "quiet"
        self.sites = {"quiet": collections.Counter(), "synchronising": collections.Counter()}
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                self.active = False  # the bookkeeping below reads no tensor, but never count ourselves
                try:
                    caller = traceback.extract_stack(limit=3)[0]
                    self.sites[self.phase][f"{name} at {caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}"] += 1
                finally:
                    self.active = True
            return original(tensor, *args, **kwargs)

        return counted


class CountSteps(TrainerCallback):
    """Counts every step's reads: quiet steps (2 to 4) apart from the ones that log or save (1 and 5)."""

    def __init__(self, reads: HostReads):
        self.reads = reads
        self.quiet_steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        quiet = 1 <= state.global_step < state.max_steps - 1
        self.quiet_steps += quiet
        self.reads.phase = "quiet" if quiet else "synchronising"
        self.reads.active = True

    def on_step_end(self, args, state, control, **kwargs):
        self.reads.active = False


@pytest.mark.parametrize("packing", [False, True], ids=["default", "packing"])
def test_no_host_read_inside_a_training_step(monkeypatch, tmp_path, packing):
    reads = HostReads(monkeypatch)
    original_init = trainer_module.RecipeTrainer.__init__

    counter = CountSteps(reads)

    def with_counter(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs["callbacks"], counter]
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.RecipeTrainer, "__init__", with_counter)
    run_in_process("device=cpu", f"train.max_steps={STEPS}", "train.logging_steps=100", "train.save_steps=100",
                   "train.gradient_accumulation_steps=2", "dataset.max_samples=64", "dataset.val_split_ratio=0",
                   f"train.packing={str(packing).lower()}", f"output_dir={tmp_path / 'run'}")
    assert (tmp_path / "run" / f"checkpoint-{STEPS}").is_dir(), "the run must have trained"
    assert counter.quiet_steps == 3
    assert dict(reads.sites["quiet"]) == {}
    # The counter sees reads where they happen: the logging and saving steps read the loss and the NaN guard's verdicts.
    assert sum(reads.sites["synchronising"].values()) > 0


class CudaSyncWarnings(TrainerCallback):
    """Under ``torch.cuda.set_sync_debug_mode("warn")`` on quiet steps, records where each synchronising CUDA call was made."""

    def __init__(self):
        self.quiet_steps = 0
        self.sites = collections.Counter()
        self._showwarning = warnings.showwarning

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            ours = [f for f in traceback.extract_stack()[:-1] if "/npu_recipes/" in f.filename or "/transformers/" in f.filename]
            self.sites[f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else str(message)[:80]] += 1
        else:
            self._showwarning(message, category, filename, lineno, file, line)

    def on_step_begin(self, args, state, control, **kwargs):
        if 1 <= state.global_step < state.max_steps - 1:
            self.quiet_steps += 1
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._showwarning


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by bench/device_check.sh)")
@pytest.mark.parametrize("packing", [False, True], ids=["default", "packing"])
def test_no_synchronising_cuda_call_inside_a_training_step(monkeypatch, tmp_path, packing):
    """The same steps on CUDA, where torch itself reports every call that makes the host wait for the device."""
    counter = CudaSyncWarnings()
    original_init = trainer_module.RecipeTrainer.__init__

    def with_counter(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs["callbacks"], counter]
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.RecipeTrainer, "__init__", with_counter)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        run_in_process("device=cuda", f"train.max_steps={STEPS}", "train.logging_steps=100", "train.save_steps=100",
                       "train.gradient_accumulation_steps=2", "dataset.max_samples=64", "dataset.val_split_ratio=0",
                       f"train.packing={str(packing).lower()}", f"output_dir={tmp_path / 'run'}")
    assert counter.quiet_steps == 3
    assert dict(counter.sites) == {}
