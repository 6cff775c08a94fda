"""npu_recipes: declarative fine-tuning recipes for Qwen-family chat models on Ascend NPUs, CUDA and CPU."""

__version__ = "0.1.0"
