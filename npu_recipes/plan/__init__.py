"""Planning before a device is rented: the device types and their memory
(:mod:`~npu_recipes.plan.targets`), the per-device memory estimate (:mod:`~npu_recipes.plan.memory`),
the planner, which also decides ``gradient_checkpointing=auto`` and advises after an out-of-memory
error (:mod:`~npu_recipes.plan.planner`), what ``stage=plan`` prints (:mod:`~npu_recipes.plan.report`),
and the recipe table of ``make list`` and docs/recipes.md (:mod:`~npu_recipes.plan.catalogue`,
:mod:`~npu_recipes.plan.recipes_page`).

May import :mod:`npu_recipes.run`, :mod:`npu_recipes.model`, :mod:`npu_recipes.runtime`,
:mod:`npu_recipes.config` and the leaf modules.
"""
