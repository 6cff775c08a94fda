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

import os as _os

__version__ = "0.1.0"

# torch >= 2.5 imports every installed device backend that registers itself for autoloading
# (torch_npu does) inside `import torch`. On an Ascend machine whose CANN environment is not
# sourced that import raises before any check of ours runs, so even device=cpu and the doctor would
# die with torch's own error. Every entry point imports this package before torch; torch_npu is
# imported explicitly where an NPU is meant (npu_recipes.runtime.devices), with a message naming
# the fix when it fails.
_os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
