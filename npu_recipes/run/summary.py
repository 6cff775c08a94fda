"""The end of a completed training run: final metrics into the manifest, loss.png, and what the user reads."""

from __future__ import annotations

import dataclasses
from typing import Optional

from npu_recipes.run import manifest, plots
from npu_recipes.run.manifest import FinalMetrics
from npu_recipes.run.rundir import LOSS_PLOT, RunDir


def _rounded(loss: Optional[float]) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def final_metrics(run_dir: RunDir) -> FinalMetrics:
    """The figures of a finished run, from its logging.jsonl and checkpoints."""
    records = run_dir.read_log()
    train_records = [r for r in records if r.get("type") == "train"]
    eval_records = [r for r in records if r.get("type") == "eval"]
    summary = next((r for r in reversed(records) if r.get("type") == "summary"), {})
    saved = run_dir.checkpoints()
    return FinalMetrics(
        steps=summary.get("step", train_records[-1]["step"] if train_records else 0),
        first_loss=train_records[0]["loss"] if train_records else None,
        last_loss=train_records[-1]["loss"] if train_records else None,
        last_eval_loss=eval_records[-1]["eval_loss"] if eval_records else None,
        train_runtime_s=summary.get("train_runtime"),
        num_input_tokens_seen=summary.get("num_input_tokens_seen"),
        peak_memory_gib=summary.get("peak_memory_gib"),
        model_tflops=summary.get("model_tflops"),
        mfu=summary.get("mfu"),
        skipped_steps=sum(1 for r in records if r.get("type") == "skipped_step"),
        last_checkpoint=str(saved[-1]) if saved else None,
    )


def finish(run_dir: RunDir, title: str, loaded_best: bool = False) -> FinalMetrics:
    """Draw loss.png (titled ``title``), record the run as completed with its final metrics (and, with
    ``loaded_best``, that ``train.load_best_model_at_end`` loaded the best checkpoint), and print where
    everything is."""
    plots.draw_loss(run_dir.read_log(), run_dir.path / LOSS_PLOT, title=title)
    metrics = final_metrics(run_dir)
    best = run_dir.read_manifest().best_checkpoint
    if best is not None:
        best = dataclasses.replace(best, loaded_at_end=loaded_best)
    run_dir.update_manifest(status=manifest.COMPLETED, finished_at=manifest.now(), final_metrics=metrics, best_checkpoint=best,
                            last_checkpoint=metrics.last_checkpoint)
    best_line = "" if best is None else (
        f"best:          {best.checkpoint} ({best.metric} {best.value:.4f}{', loaded at the end' if loaded_best else ''})\n")
    print(
        f"\nrun directory: {run_dir.path}\n"
        f"checkpoint:    {metrics.last_checkpoint}\n"
        f"{best_line}"
        f"loss:          first {_rounded(metrics.first_loss)} -> last {_rounded(metrics.last_loss)}"
        + (f" (eval {metrics.last_eval_loss:.4f})" if metrics.last_eval_loss is not None else "")
        + f"\nthroughput:    {metrics.model_tflops} model TFLOP/s per device, MFU "
        + (f"{100 * metrics.mfu:.1f}%" if metrics.mfu is not None else "n/a (no peak: see docs/mfu.md)")
        + (f"\nskipped steps: {metrics.skipped_steps} (non-finite loss or grad norm)" if metrics.skipped_steps else ""),
        flush=True,
    )
    return metrics
