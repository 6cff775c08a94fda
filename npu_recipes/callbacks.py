"""transformers ``TrainerCallback``s that write the run directory's records."""

from __future__ import annotations

import time
from typing import Any, Dict

from transformers import TrainerCallback

from npu_recipes.devices import Device
from npu_recipes.rundir import RunDir

_TRAIN_KEYS = ("loss", "learning_rate", "grad_norm")


class JsonlLogger(TrainerCallback):
    """Append one record per logging step, evaluation and end of training to ``logging.jsonl``.

    Training records: ``step``, ``epoch``, ``loss``, ``learning_rate``, ``grad_norm``,
    ``tokens_per_second`` (non-padding input tokens over all ranks per wall-clock second since the
    previous record: the Trainer gathers ``num_input_tokens_seen`` from every rank) and
    ``peak_memory_gib`` (:meth:`Device.peak_memory_gib` in GiB, the maximum over ranks). Evaluation
    records carry ``eval_loss`` instead; the final record has ``type: summary`` and adds
    ``peak_memory_gib_per_rank`` (a list in rank order). Every rank takes part in the maximum (the Trainer calls ``on_log`` on all of them with the
    same keys); only the world's process zero writes.
    """

    def __init__(self, run_dir: RunDir, device: Device):
        self.run_dir = run_dir
        self.device = device
        self._last_time = None
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs: Dict[str, Any] | None = None, **kwargs):
        if not logs:
            return
        record: Dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "eval_loss" in logs:
            record.update(type="eval", eval_loss=logs["eval_loss"])
        elif "loss" in logs:
            elapsed = time.perf_counter() - self._last_time
            tokens = state.num_input_tokens_seen - self._last_tokens
            self._last_time, self._last_tokens = time.perf_counter(), state.num_input_tokens_seen
            record["type"] = "train"
            record.update({key: logs[key] for key in _TRAIN_KEYS if key in logs})
            record["tokens_per_second"] = round(tokens / elapsed, 2) if elapsed > 0 else None
            record["peak_memory_gib"] = round(max(self.device.gather_over_ranks(self.device.peak_memory_gib())), 4)
        elif "train_runtime" in logs:
            record["type"] = "summary"
            record.update(logs)
            record["num_input_tokens_seen"] = state.num_input_tokens_seen
            per_rank = [round(peak, 4) for peak in self.device.gather_over_ranks(self.device.peak_memory_gib())]
            record["peak_memory_gib"] = max(per_rank)
            record["peak_memory_gib_per_rank"] = per_rank
        else:
            return
        if state.is_world_process_zero:
            self.run_dir.append_log(record)


class SaveAndEvaluateAtEnd(TrainerCallback):
    """Save and evaluate at the last step too, as ``swift sft`` does, not only every N steps."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True
            control.should_evaluate = args.eval_strategy != "no"
        return control
