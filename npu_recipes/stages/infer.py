"""Infer stage: a terminal chat, or batch generation over a dataset with answer scoring.

* No dataset selected (``stage=infer`` selects ``dataset=none``) and ``load_data_args=false``:
  an interactive chat (:mod:`npu_recipes.chat`).
* ``dataset=NAME`` / a local file: every row's conversation up to its last assistant turn is the
  prompt and that turn is the reference.
* ``load_data_args=true``: the training run's validation split, rebuilt from its resolved.yaml
  and checked against the row ids training recorded (:mod:`npu_recipes.heldout`).

Batch mode writes ``infer_result/<timestamp>.jsonl`` (one row per sample) and
``<timestamp>.metrics.json`` beside the checkpoint. The model is a base model, a merged model or
a base plus adapters, chosen by config alone (:func:`npu_recipes.inference.load`). The stage runs
in one process on one device.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from npu_recipes import answers, atomic, chat, data, devices, generation, heldout, inference, rundir
from npu_recipes.errors import UserError
from npu_recipes.schema import DatasetConfig, ModelConfig, RecipeConfig

log = logging.getLogger(__name__)

IN_LAUNCHER_ONLY = True
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


def _training_run(config: RecipeConfig) -> Path:
    run = inference.training_run_dir(config)
    if run is None:
        raise UserError(
            f"load_data_args=true needs the training run behind the model, but {config.adapters or config.model.name_or_path} "
            "is not a checkpoint of an npu_recipes run (no resolved.yaml beside it, no merge manifest naming one)",
            fix="pass adapters=RUN_DIR/checkpoint-N or model.name_or_path=RUN_DIR/checkpoint-N-merged, "
            "or evaluate on a dataset with dataset=NAME dataset.path=FILE",
        )
    if not (run / rundir.RESOLVED).is_file():
        raise UserError(
            f"load_data_args=true: the training run {run} has no {rundir.RESOLVED}",
            fix="restore the run directory, or evaluate with dataset=NAME dataset.path=FILE",
        )
    return run


def batch_source(config: RecipeConfig) -> Optional[BatchSource]:
    """The samples batch mode evaluates, or None for the interactive chat.

    Raises:
        UserError: no training run for ``load_data_args``, a rebuilt split that differs from the
            recorded one, or bad data (see :mod:`npu_recipes.data`).
    """
    training_run = None
    if config.load_data_args:
        training_run = _training_run(config)
        dataset, rows = heldout.rebuild(training_run)
        origin = f"validation split of {training_run}"
    elif config.dataset.path is None:
        return None
    else:
        dataset = config.dataset
        dataset.path = data.resolve_path(dataset)
        rows = data.load_rows(dataset)
        origin = f"dataset {dataset.name} ({dataset.path})"
    data.check_columns(dataset, rows.column_names)
    if config.infer.max_samples is not None:
        rows = rows.select(range(min(config.infer.max_samples, len(rows))))
    samples = []
    for row in rows:
        prompt, reference = generation.split_prompt(data.to_messages(row, dataset, require_assistant=False), config.infer.system)
        samples.append(Sample(row_id=row[data.ROW_ID], messages=prompt, reference=reference))
    if not samples:
        raise UserError(f"infer: {origin} has no rows", fix="check dataset.path and dataset.split")
    return BatchSource(dataset=dataset, samples=samples, origin=origin, training_run=training_run)


def result_dir(config: RecipeConfig, adapters: List[inference.Adapter], base: ModelConfig) -> Path:
    """``infer.result_dir``, else ``infer_result/`` in the adapter checkpoint, the merged or fine-tuned
    checkpoint, or (for a plain base model) ``output_dir``."""
    if config.infer.result_dir:
        return Path(config.infer.result_dir).expanduser().absolute()
    if adapters:
        return adapters[0].path / RESULT_DIR
    model_dir = Path(_model_location(base))
    if model_dir.is_dir() and inference.training_run_dir(config) is not None:
        return model_dir / RESULT_DIR
    return Path(config.output_dir).expanduser().absolute() / RESULT_DIR


def _model_location(base: ModelConfig) -> str:
    """The model's absolute directory when it is local, else its hub id."""
    local = Path(base.name_or_path).expanduser()
    return str(local.absolute()) if local.is_dir() else base.name_or_path


def prepare(config: RecipeConfig, fresh_output_dir: bool) -> None:
    """Check adapters, the data source and (in batch mode) the result directory before the model
    loads; the stage writes no run directory.

    Raises:
        UserError: bad adapter paths; ``load_data_args=true`` without a training run behind the
            model; a result directory that cannot be written.
    """
    adapters = inference.parse_adapters(config.adapters)
    if config.load_data_args:
        _training_run(config)
    if config.load_data_args or config.dataset.path is not None:
        directory = result_dir(config, adapters, inference.base_model_config(config, adapters))
        try:
            atomic.check_writable(directory)
        except OSError as error:
            raise UserError(
                f"cannot write inference results to {directory}: {error.strerror}: {error.filename}",
                fix="pass infer.result_dir=DIR in a writable place",
            ) from None
    return None


def _unique_stem(directory: Path) -> str:
    stem = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, suffix = stem, 2
    while (directory / f"{candidate}.jsonl").exists():
        candidate, suffix = f"{stem}-{suffix}", suffix + 1
    return candidate


def evaluate(config: RecipeConfig, loaded: inference.LoadedModel, source: BatchSource, device: devices.Device) -> Dict[str, Any]:
    """Generate for every sample in batches, score answers, write results and metrics; returns the metrics.

    Results (``<stamp>.jsonl``, one row per sample in source order: ``row_id``, prompt
    ``messages``, ``response``, ``reference``, ``generated_tokens``, and with an answer format
    ``prediction``, ``reference_answer``, ``strict``, ``correct``) and ``<stamp>.metrics.json`` are
    each written atomically. ``tokens_per_second`` counts generated tokens over generation
    wall-clock seconds.
    """
    from tqdm.auto import tqdm

    gen_config = generation.generation_config(loaded, config.infer)
    samples = source.samples
    answer_format = source.dataset.answer_format
    replies: List[Optional[generation.Reply]] = [None] * len(samples)
    started = time.perf_counter()
    with tqdm(total=len(samples), desc="generating", unit="sample") as bar:
        for batch in generation.batches_by_length(loaded, [s.messages for s in samples], config.infer.batch_size):
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
    directory = result_dir(config, loaded.adapters, loaded.base)
    directory.mkdir(parents=True, exist_ok=True)
    stem = _unique_stem(directory)
    results_path = directory / f"{stem}.jsonl"
    atomic.write_text(results_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    scored = [row for row in rows if "correct" in row]
    generated = sum(row["generated_tokens"] for row in rows)
    metrics = {
        "results": str(results_path),
        "model": _model_location(loaded.base),
        "adapters": [str(a.path) for a in loaded.adapters],
        "data": source.origin,
        "dataset": {"name": source.dataset.name, "path": source.dataset.path, "answer_format": answer_format},
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
        "batch_size": config.infer.batch_size,
        "generation_config": gen_config.to_diff_dict(),
        "device": {"type": device.type, "name": device.name(), "dtype": str(loaded.model.dtype).replace("torch.", "")},
        "command": rundir.command_line(),
        "versions": rundir.package_versions(),
        "finished_at": rundir.now(),
    }
    atomic.write_json(directory / f"{stem}.metrics.json", metrics)
    return metrics


def run(config: RecipeConfig, run_dir: Optional[rundir.RunDir]) -> None:
    """Chat, or evaluate the model on the selected data and print where the results are.

    Raises:
        UserError: as :func:`batch_source` and :func:`npu_recipes.inference.load`.
    """
    from transformers import set_seed

    source = batch_source(config)
    device = devices.resolve(config.device)
    loaded = inference.load(config, device)
    inference.stack_adapters(loaded)
    # Seeded after loading (PEFT initialises adapter weights randomly before loading them), so
    # sampling draws the same numbers as any other process seeded just before generating.
    set_seed(config.infer.seed if config.infer.seed is not None else config.train.seed)
    if source is None:
        chat.run(loaded, generation.generation_config(loaded, config.infer), config.infer.system)
        return
    log.info("generating for %d samples of the %s", len(source.samples), source.origin)
    metrics = evaluate(config, loaded, source, device)
    accuracy = ""
    if metrics["accuracy"] is not None:
        accuracy = (f"\naccuracy:   {metrics['correct']}/{metrics['scored']} = {metrics['accuracy']:.4f} "
                    f"({source.dataset.answer_format} answers; {metrics['answers_found']} responses had one, "
                    f"strict accuracy {metrics['strict_accuracy']:.4f})")
    print(
        f"\nresults:    {metrics['results']}\n"
        f"samples:    {metrics['samples']} from the {source.origin}"
        f"{accuracy}\n"
        f"generated:  {metrics['generated_tokens']} tokens, {metrics['tokens_per_second']} tokens/s",
        flush=True,
    )
