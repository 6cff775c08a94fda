"""npu_recipes: declarative fine-tuning recipes for chat models on Ascend NPUs, CUDA GPUs and CPUs.

The layers, top down (docs/architecture.md; enforced by ``.importlinter``):

* entry points: ``__main__`` and :mod:`~npu_recipes.cli` (``python -m npu_recipes``, ``npu-recipes``) and
  :mod:`~npu_recipes.worker` (one torchrun worker);
* :mod:`~npu_recipes.runner`: prepares once and runs a stage here or in torchrun workers; the only
  importer of :mod:`~npu_recipes.stages`, one module per command;
* feature packages: :mod:`~npu_recipes.train`, :mod:`~npu_recipes.serving`, :mod:`~npu_recipes.doctor`,
  then :mod:`~npu_recipes.infer` and :mod:`~npu_recipes.plan`;
* :mod:`~npu_recipes.run` (the run directory) and :mod:`~npu_recipes.model`, then :mod:`~npu_recipes.data`,
  :mod:`~npu_recipes.runtime` and :mod:`~npu_recipes.config`;
* leaf modules: :mod:`~npu_recipes.errors`, :mod:`~npu_recipes.paths`, :mod:`~npu_recipes.atomic`.
"""

__version__ = "0.1.0"
