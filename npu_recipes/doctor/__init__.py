"""Checking a machine before a long run: the checks (:mod:`~npu_recipes.doctor.checks`), parsers of
``npu-smi`` and ``nvidia-smi`` output (:mod:`~npu_recipes.doctor.smi`) and the printed table
(:mod:`~npu_recipes.doctor.report`).

May import :mod:`npu_recipes.runtime`, :mod:`npu_recipes.config` and the leaf modules.
"""
