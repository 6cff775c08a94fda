"""Batch evaluation: the prompts of a dataset (or of a training run's validation split), generated
for in batches, scored, and written as ``<timestamp>.jsonl`` plus ``<timestamp>.metrics.json``.

* ``dataset=NAME`` / a local file: every row's conversation up to its last assistant turn is the
  prompt and that turn is the reference.
* ``load_data_args=true``: the training run's validation split, rebuilt from its resolved.yaml and
  checked against the row ids training recorded (:mod:`npu_recipes.run.heldout`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from npu_recipes import atomic
from npu_recipes.config.resolved import RESOLVED
from npu_recipes.config.schema import DatasetConfig, InferConfig
from npu_recipes.data import messages, sources
from npu_recipes.errors import UserError
from npu_recipes.infer import answers, generation
from npu_recipes.infer.adapters import Adapter
from npu_recipes.infer.loading import LoadedModel
from npu_recipes.run import heldout, manifest
from npu_recipes.runtime.devices import Device

RESULT_DIR = "infer_result"


@dataclass
class Sample:
    """One prompt to answer: its source row, prompt messages and reference reply (None if absent)."""

    row_id: int
    messages: generation.Messages
    reference: Optional[str]


@dataclass
class BatchSource:
    """What batch mode evaluates: the dataset settings, the samples, and where they came from."""

    dataset: DatasetConfig
    samples: List[Sample]
    origin: str
    training_run: Optional[Path] = None


def checked_training_run(training_run: Optional[Path], model_named: str) -> Path:
    """The training run whose validation split ``load_data_args=true`` evaluates.

    Args:
        training_run: :func:`npu_recipes.infer.loading.training_run_dir` of the model to load.
        model_named: how the user named that model (adapters or ``model.name_or_path``), for the message.

    Raises:
        UserError: there is no training run behind the model, or it has no resolved.yaml.
    """
    if training_run is None:
        raise UserError(
            f"load_data_args=true needs the training run behind the model, but {model_named} "
            "is not a checkpoint of an npu_recipes run (no resolved.yaml beside it, no merge manifest naming one)",
            fix="pass adapters=RUN_DIR/checkpoint-N or model.name_or_path=RUN_DIR/checkpoint-N-merged, "
            "or evaluate on a dataset with dataset=NAME dataset.path=FILE",
        )
    if not (training_run / RESOLVED).is_file():
        raise UserError(
            f"load_data_args=true: the training run {training_run} has no {RESOLVED}",
            fix="restore the run directory, or evaluate with dataset=NAME dataset.path=FILE",
        )
    return training_run


def batch_source(dataset: DatasetConfig, infer: InferConfig, training_run: Optional[Path]) -> Optional[BatchSource]:
    """The samples batch mode evaluates: ``training_run``'s validation split when given
    (``load_data_args=true``), else ``dataset``; None for the interactive chat (no dataset).

    Raises:
        UserError: a rebuilt split that differs from the recorded one, or bad data (see :mod:`npu_recipes.data`).
    """
    if training_run is not None:
        dataset, rows = heldout.rebuild(training_run)
        origin = f"validation split of {training_run}"
    elif dataset.path is None:
        return None
    else:
        dataset = dataclasses.replace(dataset, path=sources.resolve_path(dataset))
        dataset = messages.known_layout(dataset, sources.local_columns(dataset))
        rows = sources.load_rows(dataset)
        origin = f"dataset {dataset.name} ({dataset.path})"
    messages.check_columns(dataset, rows.column_names)
    if infer.max_samples is not None:
        rows = rows.select(range(min(infer.max_samples, len(rows))))
    samples = []
    for row in rows:
        prompt, reference = generation.split_prompt(messages.to_messages(row, dataset, require_assistant=False), infer.system)
        samples.append(Sample(row_id=row[sources.ROW_ID], messages=prompt, reference=reference))
    if not samples:
        raise UserError(f"infer: {origin} has no rows", fix="check dataset.path and dataset.split")
    return BatchSource(dataset=dataset, samples=samples, origin=origin, training_run=training_run)


def model_location(name_or_path: str) -> str:
    """The model's absolute directory when it is local, else its hub id."""
    local = Path(name_or_path).expanduser()
    return str(local.absolute()) if local.is_dir() else name_or_path


def result_dir(infer: InferConfig, adapters: List[Adapter], model_name_or_path: str, has_training_run: bool, output_dir: str) -> Path:
    """``infer.result_dir``, else ``infer_result/`` in the adapter checkpoint, the merged or fine-tuned
    checkpoint (a model with a training run behind it), or (for a plain base model) ``output_dir``."""
    if infer.result_dir:
        return Path(infer.result_dir).expanduser().absolute()
    if adapters:
        return adapters[0].path / RESULT_DIR
    model_dir = Path(model_location(model_name_or_path))
    if model_dir.is_dir() and has_training_run:
        return model_dir / RESULT_DIR
    return Path(output_dir).expanduser().absolute() / RESULT_DIR


def _unique_stem(directory: Path) -> str:
    stem = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, suffix = stem, 2
    while (directory / f"{candidate}.jsonl").exists():
        candidate, suffix = f"{stem}-{suffix}", suffix + 1
    return candidate


def evaluate(loaded: LoadedModel, source: BatchSource, infer: InferConfig, device: Device, directory: Path) -> Dict[str, Any]:
    """Generate for every sample in batches of ``infer.batch_size``, score answers, write results and
    metrics into ``directory``; returns the metrics.

    Results (``<stamp>.jsonl``, one row per sample in source order: ``row_id``, prompt
    ``messages``, ``response``, ``reference``, ``generated_tokens``, and with an answer format
    ``prediction``, ``reference_answer``, ``strict``, ``correct``) and ``<stamp>.metrics.json`` are
    each written atomically. ``tokens_per_second`` counts generated tokens over generation
    wall-clock seconds.
    """
    from tqdm.auto import tqdm

    gen_config = generation.for_infer(loaded, infer)
    samples = source.samples
    answer_format = source.dataset.answer_format
    replies: List[Optional[generation.Reply]] = [None] * len(samples)
    started = time.perf_counter()
    with tqdm(total=len(samples), desc="generating", unit="sample") as bar:
        for batch in generation.batches_by_length(loaded, [s.messages for s in samples], infer.batch_size):
            for index, reply in zip(batch, generation.generate(loaded, [samples[i].messages for i in batch], gen_config)):
                replies[index] = reply
            bar.update(len(batch))
    seconds = time.perf_counter() - started
    rows = []
    for sample, reply in zip(samples, replies):
        row = {"row_id": sample.row_id, "messages": sample.messages, "response": reply.text,
               "reference": sample.reference, "generated_tokens": reply.generated_tokens}
        if answer_format and sample.reference is not None:
            row.update(answers.score(reply.text, sample.reference, answer_format))
        rows.append(row)
    directory.mkdir(parents=True, exist_ok=True)
    stem = _unique_stem(directory)
    results_path = directory / f"{stem}.jsonl"
    atomic.write_text(results_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    scored = [row for row in rows if "correct" in row]
    generated = sum(row["generated_tokens"] for row in rows)
    metrics = {
        "results": str(results_path),
        "model": model_location(loaded.base.name_or_path),
        "adapters": [str(a.path) for a in loaded.adapters],
        "data": source.origin,
        "dataset": {"name": source.dataset.name, "path": source.dataset.path, "answer_format": answer_format,
                    **{key: getattr(source.dataset, key) for key in ("messages_column", "user_template", "assistant_template")}},
        "training_run": str(source.training_run) if source.training_run else None,
        "samples": len(rows),
        "scored": len(scored),
        "correct": sum(row["correct"] for row in scored),
        "accuracy": sum(row["correct"] for row in scored) / len(scored) if scored else None,
        "strict_accuracy": sum(row["correct"] and row["strict"] for row in scored) / len(scored) if scored else None,
        "answers_found": sum(row["prediction"] is not None for row in scored),
        "generated_tokens": generated,
        "generation_seconds": round(seconds, 3),
        "tokens_per_second": round(generated / seconds, 2) if seconds > 0 else None,
        "batch_size": infer.batch_size,
        "generation_config": gen_config.to_diff_dict(),
        "device": {"type": device.type, "name": device.name(), "dtype": str(loaded.model.dtype).replace("torch.", "")},
        "command": manifest.command_line(),
        "versions": manifest.package_versions(),
        "finished_at": manifest.now(),
    }
    atomic.write_json(directory / f"{stem}.metrics.json", metrics)
    return metrics
