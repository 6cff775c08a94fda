"""Model FLOPs of a training step and the chip peaks that model FLOPs utilisation (MFU) divides by.

The formula and the sources of every number are in docs/mfu.md. In short, per non-padding token:

* every matmul weight (``nn.Linear``, the output head included, the embedding lookup excluded)
  costs 2 FLOPs per weight forward and 2 more backward for the gradient of its input: ``4·N``;
* a trainable weight costs 2 more for its own gradient: ``6·N_trainable`` (full fine-tuning: all of
  ``N``; LoRA: the adapter matrices ``N_lora``, while the frozen base weights cost ``4·N_frozen``);
* attention ``softmax(QKᵀ)V`` costs ``4·d`` FLOPs per (query, key) pair forward and twice that
  backward, ``12·d`` per pair and layer, where ``d`` = query heads × head dim; a causal token at
  position ``p`` (0-based) of its sequence attends to ``p + 1`` keys.

Recomputation for gradient checkpointing is not counted: MFU counts the model's work, not the
hardware's (Chowdhery et al. 2022, "PaLM", appendix B).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import torch


TERA = 1e12

# Dense (no 2:4 sparsity) tensor-unit peaks per chip in TFLOP/s, for bf16 and fp16 (equal on all of
# these). Matched against the device name torch reports (``Ascend910B3``, ``NVIDIA H100 80GB HBM3``),
# first match wins, so the more specific H100/H200 variants come before the plain names.
# Sources (docs/mfu.md): NVIDIA's A100, H100 and H200 datasheets (sparse figures halved); for the
# Ascend 910B variants, the FP16 figures commonly quoted for them, not verified against a Huawei
# datasheet (assumed equal for bf16); override with mfu.peak_tflops.
PEAK_TFLOPS: Tuple[Tuple[str, str, float], ...] = (
    (r"910B1", "Ascend 910B1", 414.0),
    (r"910B2", "Ascend 910B2", 376.0),
    (r"910B3", "Ascend 910B3", 313.0),
    (r"910B4", "Ascend 910B4", 280.0),
    (r"A100", "NVIDIA A100", 312.0),
    (r"H100.*PCIe", "NVIDIA H100 PCIe", 756.0),
    (r"H100.*NVL", "NVIDIA H100 NVL", 835.0),
    (r"H100", "NVIDIA H100 SXM", 989.4),
    (r"H200.*NVL", "NVIDIA H200 NVL", 835.0),
    (r"H200", "NVIDIA H200 SXM", 989.4),
)
"""(regular expression on the device name, chip label, dense bf16/fp16 peak in TFLOP/s per chip)."""

_TABLE_DTYPES = ("torch.bfloat16", "torch.float16")


def table_peak(device_name: str) -> Optional[Tuple[str, float]]:
    """The chip label and dense bf16/fp16 peak (TFLOP/s per chip) for ``device_name``, or None if unlisted."""
    for pattern, label, peak in PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return label, peak
    return None


@dataclass(frozen=True)
class Peak:
    """The peak one device is measured against.

    Attributes:
        tflops: peak TFLOP/s of one device, or None when there is none to compare with (CPU, fp32,
            an unlisted chip) and none was configured.
        source: where the number came from (``mfu.peak_tflops``, the table row, or why there is none).
    """

    tflops: Optional[float]
    source: str


def resolve_peak(configured: Optional[float], device_type: str, device_name: str, dtype: torch.dtype) -> Peak:
    """The peak to divide by: ``mfu.peak_tflops`` when set, else the table row for a bf16/fp16 run on an accelerator.

    The table holds tensor-unit bf16/fp16 peaks only, so an fp32 run or a CPU has no peak unless one is configured.
    """
    if configured is not None:
        return Peak(float(configured), "mfu.peak_tflops")
    if device_type == "cpu":
        return Peak(None, "no peak for a CPU (set mfu.peak_tflops to measure against one)")
    if str(dtype) not in _TABLE_DTYPES:
        return Peak(None, f"the peak table covers bf16/fp16 only, this run is {str(dtype).replace('torch.', '')}")
    row = table_peak(device_name)
    if row is None:
        return Peak(None, f"{device_name!r} is not in the peak table (set mfu.peak_tflops)")
    return Peak(row[1], f"{row[0]} dense bf16/fp16 peak")


@dataclass(frozen=True)
class FlopsModel:
    """Training FLOPs of a causal decoder, from its matmul weights and attention shape.

    Attributes:
        frozen_matmul_params: weights of ``nn.Linear`` modules that receive no gradient (LoRA's base model).
        trainable_matmul_params: weights of ``nn.Linear`` modules that are trained (all of them in full
            fine-tuning; LoRA's A and B matrices).
        num_layers: decoder layers.
        attention_width: query heads × head dim (``d``).
    """

    frozen_matmul_params: int
    trainable_matmul_params: int
    num_layers: int
    attention_width: int

    @classmethod
    def from_model(cls, model: torch.nn.Module, config) -> "FlopsModel":
        """Count ``model``'s matmul weights (a module shared by two layers, like tied embeddings, counts for each
        use) and read layers and attention width from its transformers ``config``."""
        import torch
        frozen = trainable = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                # Under ZeRO-3 each process holds an empty shard; DeepSpeed keeps the full size as ds_numel.
                count = getattr(module.weight, "ds_numel", module.weight.numel())
                if module.weight.requires_grad:
                    trainable += count
                else:
                    frozen += count
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(frozen, trainable, config.num_hidden_layers, config.num_attention_heads * head_dim)

    @property
    def dense_flops_per_token(self) -> int:
        """``4·N_frozen + 6·N_trainable``: forward and backward matmul FLOPs of one token, attention excluded."""
        return 4 * self.frozen_matmul_params + 6 * self.trainable_matmul_params

    def batch_flops(self, sample_lengths: Sequence[int]) -> float:
        """FLOPs of one forward + backward pass over a micro-batch of samples of ``sample_lengths`` tokens
        (padding excluded; packed samples each count as their own sequence).

        Host-side integers, not the batch's tensors: counting must never read a device value inside a
        training step (:data:`npu_recipes.data.packing.SAMPLE_LENGTHS`).

        Returns:
            ``dense_flops_per_token · T + 12 · layers · d · Σ L(L + 1)/2`` with ``T = Σ L``: a token at
            position ``p`` of its sample attends to ``p + 1`` keys.
        """
        tokens = sum(sample_lengths)
        attended_keys = sum(length * (length + 1) // 2 for length in sample_lengths)
        return float(self.dense_flops_per_token * tokens + 12 * self.num_layers * self.attention_width * attended_keys)


def utilisation(flops: float, seconds: float, peak: Peak, world_size: int) -> Optional[float]:
    """MFU: model FLOPs per second over all devices, divided by ``world_size`` × the per-device peak; None without a peak."""
    if peak.tflops is None or seconds <= 0:
        return None
    return flops / seconds / (peak.tflops * TERA * world_size)
