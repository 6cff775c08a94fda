"""transformers ``TrainerCallback``s that write the run directory's records."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

from transformers import TrainerCallback

from npu_recipes.model import flops
from npu_recipes.run.manifest import finite_or_null
from npu_recipes.run.rundir import RunDir
from npu_recipes.runtime.devices import Device

_TRAIN_KEYS = ("loss", "learning_rate", "grad_norm", "skipped_steps")


def _significant(value: Optional[float], digits: int = 4) -> Optional[float]:
    return None if value is None else float(f"{value:.{digits}g}")


class JsonlLogger(TrainerCallback):
    """Append one record per logging step, evaluation and end of training to ``logging.jsonl``.

    Training records: ``step``, ``epoch``, ``loss``, ``learning_rate``, ``grad_norm``, ``skipped_steps``
    (optimizer steps the NaN guard skipped so far),
    ``tokens_per_second`` (non-padding input tokens over all ranks per wall-clock second since the
    previous record: the Trainer gathers ``num_input_tokens_seen`` from every rank),
    ``peak_memory_gib`` (:meth:`Device.peak_memory_gib` in GiB, the maximum over ranks), ``model_tflops``
    (model TFLOP/s per device, from the Trainer's ``total_flos``; see :mod:`npu_recipes.model.flops`) and
    ``mfu`` (``model_tflops`` over the device's peak; null without a peak). Evaluation records carry
    ``eval_loss`` instead; the final record has ``type: summary`` with the whole run's figures and
    ``peak_memory_gib_per_rank`` (a list in rank order). inf/NaN values are written as null. Every
    rank takes part in gathering the peaks (the Trainer calls ``on_log`` on all of them with the
    same keys); only the world's process zero writes.
    """

    def __init__(self, run_dir: RunDir, device: Device, peak: flops.Peak, world_size: int = 1):
        self.run_dir = run_dir
        self.device = device
        self.peak = peak
        self.world_size = world_size
        self._last_time = None
        self._last_tokens = 0
        self._last_flos = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        self._last_flos = state.total_flos

    def _throughput(self, model_flops: float, seconds: float) -> Dict[str, Optional[float]]:
        per_device = model_flops / seconds / self.world_size / flops.TERA if seconds > 0 else None
        return {
            "model_tflops": _significant(per_device),
            "mfu": _significant(flops.utilisation(model_flops, seconds, self.peak, self.world_size)),
        }

    def on_log(self, args, state, control, logs: Dict[str, Any] | None = None, **kwargs):
        if not logs:
            return
        record: Dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "eval_loss" in logs:
            record.update(type="eval", eval_loss=logs["eval_loss"])
        elif "loss" in logs:
            elapsed = time.perf_counter() - self._last_time
            tokens = state.num_input_tokens_seen - self._last_tokens
            model_flops = state.total_flos - self._last_flos
            self._last_time, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen
            self._last_flos = state.total_flos
            record["type"] = "train"
            record.update({key: finite_or_null(logs[key]) for key in _TRAIN_KEYS if key in logs})
            record["tokens_per_second"] = round(tokens / elapsed, 2) if elapsed > 0 else None
            record["peak_memory_gib"] = round(max(self.device.gather_over_ranks(self.device.peak_memory_gib())), 4)
            record.update(self._throughput(model_flops, elapsed))
        elif "train_runtime" in logs:
            record["type"] = "summary"
            record.update({key: finite_or_null(value) for key, value in logs.items()})
            record["num_input_tokens_seen"] = state.num_input_tokens_seen
            per_rank = [round(peak, 4) for peak in self.device.gather_over_ranks(self.device.peak_memory_gib())]
            record["peak_memory_gib"] = max(per_rank)
            record["peak_memory_gib_per_rank"] = per_rank
            record.update(self._throughput(state.total_flos, logs["train_runtime"]))
            record["peak_tflops"] = self.peak.tflops
        else:
            return
        if state.is_world_process_zero:
            self.run_dir.append_log(record)


class SaveAndEvaluateAtEnd(TrainerCallback):
    """Log, save and evaluate at the last step too (as ``swift sft`` saves and evaluates), not only every N steps."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
            control.should_save = True
            control.should_evaluate = args.eval_strategy != "no"
        return control


class CurrentIntervals(TrainerCallback):
    """Log, evaluate and save at this launch's ``train.logging_steps``, ``eval_steps`` and ``save_steps``.

    On resume transformers restores these intervals from the checkpoint's ``trainer_state.json``
    and only warns when the arguments differ, so a rerun that changes them (which
    :data:`npu_recipes.run.resume.MAY_CHANGE` allows) would silently keep the old ones.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)
