"""DeepSpeed configurations generated from the composed config, never hand-copied JSON files.

Every value the transformers Trainer knows is left as ``"auto"``, and the Trainer fills it from
``TrainingArguments`` (``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig``): micro-batch
size, gradient accumulation, global batch, gradient clipping, bf16/fp16, and with ZeRO-3 the bucket
sizes derived from the model's hidden size (``reduce_bucket_size`` = hidden², for every stage). What remains is the ZeRO stage and offload placement
from ``parallelism.*``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Dict

from npu_recipes.config.schema import ParallelismConfig
from npu_recipes.runtime.devices import Device

log = logging.getLogger(__name__)

AUTO = "auto"


def uses_deepspeed(parallelism: ParallelismConfig) -> bool:
    """True when ``parallelism`` asks for DeepSpeed (``zero_stage`` set)."""
    return parallelism.zero_stage is not None


def _offload(target: str, device: Device) -> Dict[str, Any]:
    # Pinned host memory speeds up device<->host copies; a CPU run has no device to copy to.
    return {"device": target, "pin_memory": device.is_accelerator}


def build(parallelism: ParallelismConfig, device: Device) -> Dict[str, Any]:
    """The DeepSpeed config dict for ``parallelism`` on ``device`` (pass it as ``TrainingArguments(deepspeed=...)``).

    * Stage 2 partitions optimizer states and gradients; stage 3 also the parameters, and gathers
      them into 16-bit full tensors when the Trainer saves (``stage3_gather_16bit_weights_on_model_save``),
      so checkpoints hold full-shape weights (a loadable model, or a full-shape LoRA adapter).
    * Without offload no ``optimizer`` section is written: the Trainer's own optimizer
      (``train.optim``, AdamW by default) runs inside ZeRO, so ZeRO and DDP follow the same update
      rule. With the optimizer offloaded to the CPU DeepSpeed requires its own CPU Adam
      (``DeepSpeedCPUAdam``, AdamW mode), whose hyperparameters are again ``"auto"``.

    Raises:
        ValueError: ``parallelism.zero_stage`` is None (see :func:`uses_deepspeed`).
    """
    if not uses_deepspeed(parallelism):
        raise ValueError(f"parallelism={parallelism.name} does not use DeepSpeed")
    zero: Dict[str, Any] = {
        "stage": parallelism.zero_stage,
        "overlap_comm": device.is_accelerator,
        "contiguous_gradients": True,
        "reduce_bucket_size": AUTO,
    }
    if parallelism.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=AUTO,
            stage3_param_persistence_threshold=AUTO,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if parallelism.offload_optimizer_device != "none":
        zero["offload_optimizer"] = _offload(parallelism.offload_optimizer_device, device)
    if parallelism.offload_param_device != "none":
        zero["offload_param"] = _offload(parallelism.offload_param_device, device)
    config: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": AUTO,
        "train_batch_size": AUTO,
        "gradient_clipping": AUTO,
        "bf16": {"enabled": AUTO},
        "fp16": {"enabled": AUTO, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if parallelism.offload_optimizer_device != "none":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": AUTO, "betas": AUTO, "eps": AUTO, "weight_decay": AUTO},
        }
    return config


def announce_op_builds() -> None:
    """Make every C++ op DeepSpeed compiles just in time say so before and after, in this process.

    DeepSpeed builds its ops (the CPU accelerator's shared-memory communication, CPU Adam under
    offload, ...) on first use with ninja, and says nothing for minutes (4 min 20 s measured for
    the first ZeRO run on a 2-core machine); later runs load the cached build in a second. The
    wrapper around ``OpBuilder.jit_load`` (DeepSpeed's just-in-time path; prebuilt ops never reach
    it) logs the op's name and the build cache before, and the time taken after.
    """
    from deepspeed.ops.op_builder.builder import OpBuilder

    original = OpBuilder.jit_load
    if getattr(original, "announces", False):
        return

    @functools.wraps(original)
    def jit_load(self, verbose=True):
        from torch.utils.cpp_extension import get_default_build_root

        cache = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
        log.info("DeepSpeed op %s: compiling it unless %s holds a build for this machine (the first time takes "
                 "minutes, with no output until it is done)", self.name, cache)
        started = time.perf_counter()
        module = original(self, verbose)
        log.info("DeepSpeed op %s ready after %.1f s", self.name, time.perf_counter() - started)
        return module

    jit_load.announces = True
    OpBuilder.jit_load = jit_load
