"""Infer stage: a terminal chat, or batch generation over a dataset with answer scoring.

* No dataset selected (``stage=infer`` selects ``dataset=none``) and ``load_data_args=false``:
  an interactive chat (:mod:`npu_recipes.infer.chat`).
* ``dataset=NAME`` / a local file, or ``load_data_args=true`` (the training run's validation
  split): batch mode (:mod:`npu_recipes.infer.evaluation`), which writes
  ``infer_result/<timestamp>.jsonl`` and ``<timestamp>.metrics.json`` beside the checkpoint.

The model is a base model, a merged model or a base plus adapters, chosen by config alone
(:mod:`npu_recipes.infer.adapters`). The stage runs in one process on one device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, NamedTuple, Optional

from npu_recipes import atomic
from npu_recipes.config import compose
from npu_recipes.config.schema import ModelConfig, RecipeConfig
from npu_recipes.errors import UserError
from npu_recipes.infer import adapters, chat, evaluation, generation, loading
from npu_recipes.run.rundir import RunDir
from npu_recipes.runtime import devices
from npu_recipes.stages import Prepared

log = logging.getLogger(__name__)


class _Inputs(NamedTuple):
    adapters: List[adapters.Adapter]
    base: ModelConfig
    training_run: Optional[Path]
    result_dir: Optional[Path]


def _inputs(config: RecipeConfig) -> _Inputs:
    """The adapters, base model, training run (``load_data_args``) and result directory (batch
    mode), each checked; the adapters' files are read once, here."""
    parsed = adapters.parse_adapters(config.adapters)
    base = adapters.base_model_config(config.model, parsed, compose.command_line_keys())
    behind = loading.training_run_dir(parsed, config.model.name_or_path)
    training_run = None
    if config.load_data_args:
        training_run = evaluation.checked_training_run(behind, str(config.adapters or config.model.name_or_path))
    result_dir = None
    if config.load_data_args or config.dataset.path is not None:
        result_dir = evaluation.result_dir(config.infer, parsed, base.name_or_path, behind is not None, config.output_dir)
    return _Inputs(parsed, base, training_run, result_dir)


class InferStage:
    in_launcher_only = True

    def prepare(self, config: RecipeConfig, fresh_output_dir: bool) -> Prepared:
        """Check adapters, the data source and (in batch mode) the result directory before the model
        loads; the stage writes no run directory.

        Raises:
            UserError: bad adapter paths; ``load_data_args=true`` without a training run behind the
                model; a result directory that cannot be written.
        """
        result_dir = _inputs(config).result_dir
        if result_dir is not None:
            try:
                atomic.check_writable(result_dir)
            except OSError as error:
                raise UserError(
                    f"cannot write inference results to {result_dir}: {error.strerror}: {error.filename}",
                    fix="pass infer.result_dir=DIR in a writable place",
                ) from None
        return Prepared(config, None)

    def run(self, config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
        """Chat, or evaluate the model on the selected data and print where the results are.

        Raises:
            UserError: as :func:`npu_recipes.infer.evaluation.batch_source` and :func:`npu_recipes.infer.loading.load`.
        """
        from transformers import set_seed

        inputs = _inputs(config)
        source = evaluation.batch_source(config.dataset, config.infer, inputs.training_run)
        device = devices.resolve(config.device)
        log.info("base model: %s (from %s)", inputs.base.name_or_path, adapters.base_model_source(inputs.adapters, compose.command_line_keys()))
        loaded = loading.load(inputs.base, inputs.adapters, device)
        loading.stack_adapters(loaded)
        # Seeded after loading (PEFT initialises adapter weights randomly before loading them), so
        # sampling draws the same numbers as any other process seeded just before generating.
        set_seed(config.infer.seed if config.infer.seed is not None else config.train.seed)
        if source is None:
            chat.run(loaded, generation.for_infer(loaded, config.infer), config.infer.system)
            return
        log.info("generating for %d samples of the %s", len(source.samples), source.origin)
        metrics = evaluation.evaluate(loaded, source, config.infer, device, inputs.result_dir)
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


STAGE = InferStage()
