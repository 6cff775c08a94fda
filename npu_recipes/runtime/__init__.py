"""Where and how processes run: everything that differs between Ascend NPUs, CUDA GPUs and the CPU
(:mod:`~npu_recipes.runtime.devices`: how a process uses its device, with the one ``device=auto`` rule
and the one reader of the visibility variables), starting torchrun workers
(:mod:`~npu_recipes.runtime.launch`) and the generated DeepSpeed config
(:mod:`~npu_recipes.runtime.deepspeed_config`).

May import :mod:`npu_recipes.config` and the leaf modules.
"""
