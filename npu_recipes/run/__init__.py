"""The run directory and everything that keeps it whole: its layout (:mod:`~npu_recipes.run.rundir`),
the typed ``manifest.json`` and its only writer (:mod:`~npu_recipes.run.manifest`), checkpoints
written whole and rotated (:mod:`~npu_recipes.run.checkpoints`), resuming
(:mod:`~npu_recipes.run.resume`), the run lock (:mod:`~npu_recipes.run.lock`), stopping on a signal
with a checkpoint (:mod:`~npu_recipes.run.stopping`), the held-out rows
(:mod:`~npu_recipes.run.heldout`), ``loss.png`` (:mod:`~npu_recipes.run.plots`) and the final summary
(:mod:`~npu_recipes.run.summary`).

May import :mod:`npu_recipes.data`, :mod:`npu_recipes.runtime`, :mod:`npu_recipes.config` and the leaf modules.
"""
