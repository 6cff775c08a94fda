"""The composed config: a dataclass schema per config group (:mod:`~npu_recipes.config.schema`),
composition of ``conf/`` groups, recipes and command-line overrides with Hydra
(:mod:`~npu_recipes.config.compose`), the rules a type cannot express (:mod:`~npu_recipes.config.validate`),
and ``resolved.yaml`` I/O (:mod:`~npu_recipes.config.resolved`).

Imports no other package of npu_recipes, only the leaf modules :mod:`npu_recipes.errors` and
:mod:`npu_recipes.paths`. Everything else reads its settings from here, one section at a time.
"""
