"""The device types a plan can be made for, with their memory: data only, nothing is probed.

``stage=plan`` runs before the hardware is rented, so it cannot ask the device how much memory it
has; it looks the chosen ``plan.target`` up here instead (``cpu`` is the one exception: the host
RAM of the machine running the plan). How a running process uses the device it has lives in
:mod:`npu_recipes.runtime.devices`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Target:
    """One device type a training run can be planned for.

    Attributes:
        name: the ``plan.target`` value (``ascend_910b3``).
        label: how people write it (``Ascend 910B3``).
        device_type: the ``device`` value that runs on it (``npu``, ``cuda``, ``cpu``).
        memory_gib: memory of one device in GiB (HBM; None for ``cpu``: the host's RAM, read at plan time).
        reserve_gib: memory the runtime holds before any tensor is allocated (firmware, driver
            and context), GiB; subtracted from ``memory_gib`` to get what tensors can use.
        fused_dropout: dropout keeps a 1-byte boolean mask (the fused kernels of CUDA and
            torch_npu) rather than a mask in the activation dtype (the CPU kernel).
        foreach_optimizer: ``torch.optim.AdamW`` uses its multi-tensor (foreach) implementation,
            whose step holds one temporary as large as a whole optimizer state; on the CPU it
            steps tensor by tensor.
        overhead_gib: allocations no formula covers (kernel workspaces, RoPE caches, the batch),
            GiB; fitted to the measurements in bench/results/ (see docs/memory.md).
        overlap_comm: DeepSpeed overlaps communication with computation here (npu_recipes'
            generated config turns it on for accelerators), which holds more bucket memory.
        auto_dtype: the dtype ``model.torch_dtype=auto`` loads in here, or None for the
            checkpoint's own (every listed accelerator computes bf16 natively; the CPU trains in
            fp32, as :func:`npu_recipes.model.pretrained.select_dtype` decides).
        source: where ``memory_gib`` and ``reserve_gib`` come from.
    """

    name: str
    label: str
    device_type: str
    memory_gib: float | None
    reserve_gib: float
    fused_dropout: bool
    foreach_optimizer: bool
    overhead_gib: float
    overlap_comm: bool
    auto_dtype: str | None
    source: str


_NPU_SOURCE = (
    "npu-smi info: 65536 MB HBM per 910B3, 3314-3318 MB in use with no process "
    "(../shared/fixtures/npu-smi/info_8x910B3.txt); 910B1/B2 have the same 64 GB, 910B4 has 32 GB"
)
_NVIDIA_SOURCE = "NVIDIA's nominal memory; about 1.5 GiB goes to the driver's reservation and the CUDA context"


def _ascend(model: str, memory_gib: float) -> Target:
    return Target(f"ascend_{model.lower()}", f"Ascend {model}", "npu", memory_gib, 3.3, True, True, 0.25, True, None, _NPU_SOURCE)


def _nvidia(name: str, label: str, memory_gib: float) -> Target:
    return Target(name, label, "cuda", memory_gib, 1.5, True, True, 0.25, True, None, _NVIDIA_SOURCE)


TARGETS: Dict[str, Target] = {
    target.name: target
    for target in (
        _ascend("910B1", 64.0),
        _ascend("910B2", 64.0),
        _ascend("910B3", 64.0),
        _ascend("910B4", 32.0),
        _nvidia("a100_40gb", "NVIDIA A100 40GB", 40.0),
        _nvidia("a100_80gb", "NVIDIA A100 80GB", 80.0),
        _nvidia("h100_80gb", "NVIDIA H100 80GB", 80.0),
        _nvidia("h200", "NVIDIA H200", 141.0),
        Target("cpu", "CPU (host RAM)", "cpu", None, 0.0, False, False, 0.0, False, "float32", "physical RAM of the machine running the plan"),
    )
}
"""Every ``plan.target`` choice except ``auto``, by name."""

DEFAULT_FOR_DEVICE = {"auto": "ascend_910b3", "npu": "ascend_910b3", "cuda": "a100_80gb", "cpu": "cpu"}
"""``plan.target=auto`` picks by the ``device`` setting: the seed document's 910B3 for npu (and auto,
since the recipes are written for it), an A100 80GB for cuda, the host RAM for cpu."""


def resolve(target: str, device: str) -> Target:
    """The :class:`Target` for ``plan.target`` (``auto`` picks by ``device``, see :data:`DEFAULT_FOR_DEVICE`)."""
    return TARGETS[DEFAULT_FOR_DEVICE[device] if target == "auto" else target]
