"""Models: finding, building and loading pretrained models and tokenizers, LoRA wrapping and the
shipped config.json copies (:mod:`~npu_recipes.model.pretrained`), fused kernels
(:mod:`~npu_recipes.model.kernels`), attention over packed rows (:mod:`~npu_recipes.model.attention`),
model FLOPs and chip peaks for MFU (:mod:`~npu_recipes.model.flops`) and the tiny Qwen2 model built
for tests and the demo (:mod:`~npu_recipes.model.tiny`).

May import :mod:`npu_recipes.data` (the tiny model's tokenizer is trained on demo rows),
:mod:`npu_recipes.runtime`, :mod:`npu_recipes.config` and the leaf modules.
"""
