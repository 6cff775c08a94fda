"""Training around transformers' ``Trainer``: ``TrainingArguments`` from ``train.*``
(:mod:`~npu_recipes.train.arguments`), the ``Trainer`` subclass with model FLOPs, the NaN guard's hooks
and checkpoints written whole (:mod:`~npu_recipes.train.trainer`), the callbacks that write
logging.jsonl and honour the current intervals (:mod:`~npu_recipes.train.callbacks`), and the NaN guard
(:mod:`~npu_recipes.train.nan_guard`). The train stage (:mod:`npu_recipes.stages.train`) wires them up.

May import :mod:`npu_recipes.run`, :mod:`npu_recipes.model`, :mod:`npu_recipes.data`,
:mod:`npu_recipes.runtime`, :mod:`npu_recipes.config` and the leaf modules.
"""
