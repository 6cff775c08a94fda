"""Everything that differs between Ascend NPUs, CUDA GPUs and the CPU, in one place.

Stages ask a :class:`Device` for device strings, memory statistics, bf16 support and
launcher settings; no other module branches on the device type.
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
from dataclasses import dataclass

import torch

from npu_recipes.errors import UserError

GIB = 1024**3


def _npu_import_error() -> UserError | None:
    """Import torch_npu; return a UserError describing what is missing instead of raising ImportError."""
    if "torch_npu" in sys.modules:
        return None
    if not (os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")):
        cann_hint = "source CANN's environment first (source /usr/local/Ascend/ascend-toolkit/set_env.sh)"
    else:
        cann_hint = "CANN's environment is sourced"
    try:
        importlib.import_module("torch_npu")
    except ImportError as error:
        return UserError(
            f"device=npu needs the torch_npu package, which failed to import ({error}); {cann_hint}",
            fix=f"pip install torch-npu=={torch.__version__.split('+')[0]} (it must match torch "
            f"{torch.__version__}), source CANN's set_env.sh, or choose device=cuda/cpu",
        )
    return None


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    return _npu_import_error() is None and torch.npu.is_available()


@dataclass(frozen=True)
class Device:
    """One accelerator type and how many of it this process can see.

    Attributes:
        type: ``npu``, ``cuda`` or ``cpu``.
        count: visible devices of that type (1 for the CPU).
    """

    type: str
    count: int

    @property
    def module(self):
        """The torch submodule with the memory and device API (``torch.npu``/``torch.cuda``), or None for CPU."""
        return getattr(torch, self.type) if self.type != "cpu" else None

    def torch_device(self, local_rank: int = 0) -> torch.device:
        """The ``torch.device`` for a process of local rank ``local_rank`` (``npu:N``, ``cuda:N``, ``cpu``)."""
        return torch.device("cpu") if self.type == "cpu" else torch.device(self.type, local_rank)

    @property
    def distributed_backend(self) -> str:
        """The process-group backend: hccl (NPU), nccl (CUDA), gloo (CPU)."""
        return {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[self.type]

    @property
    def visibility_variable(self) -> str | None:
        """Environment variable that restricts visible devices, or None for the CPU."""
        return {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}.get(self.type)

    @property
    def deepspeed_accelerator(self) -> str:
        """Value for DeepSpeed's ``DS_ACCELERATOR`` environment variable."""
        return self.type

    def name(self) -> str:
        """Human-readable chip name (e.g. ``Ascend910B3``, ``NVIDIA H200``) or the CPU's architecture."""
        if self.type == "cpu":
            import platform

            return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
        return self.module.get_device_name(0)

    def supports_bf16(self) -> bool:
        """True when bf16 tensors compute natively here (910B and Ampere-or-newer; always on CPU)."""
        if self.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return True

    def total_memory_gib(self) -> float:
        """Memory of one device in GiB (HBM for NPU/GPU, physical RAM for the CPU)."""
        if self.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        return self.module.get_device_properties(0).total_memory / GIB

    def reset_peak_memory(self) -> None:
        """Reset the peak-allocation counter (no-op on CPU, where the peak is the process's max RSS)."""
        if self.module is not None:
            self.module.reset_peak_memory_stats()

    def peak_memory_gib(self) -> float:
        """Peak memory of this process in GiB.

        NPU/GPU: ``max_memory_allocated`` of the current device (tensors only, as torch reports it).
        CPU: the process's peak resident set size (``getrusage`` ru_maxrss, KiB on Linux).
        """
        if self.module is not None:
            return self.module.max_memory_allocated() / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB

    def set_current(self, local_rank: int) -> None:
        """Make ``local_rank``'s device the current one for this process (no-op on CPU)."""
        if self.module is not None:
            self.module.set_device(local_rank)


def resolve(requested: str) -> Device:
    """Turn ``device=auto|npu|cuda|cpu`` into a :class:`Device`.

    ``auto`` picks npu when torch_npu imports and sees a device, then cuda, then cpu.

    Raises:
        UserError: an explicitly requested npu/cuda is missing (names the package or driver to install).
    """
    if requested == "auto":
        if _npu_available():
            return Device("npu", torch.npu.device_count())
        if torch.cuda.is_available():
            return Device("cuda", torch.cuda.device_count())
        return Device("cpu", 1)
    if requested == "npu":
        error = _npu_import_error()
        if error is not None:
            raise error
        if not torch.npu.is_available() or torch.npu.device_count() == 0:
            raise UserError(
                "device=npu: torch_npu imported but sees no NPU",
                fix="check `npu-smi info`, the driver, and ASCEND_RT_VISIBLE_DEVICES",
            )
        return Device("npu", torch.npu.device_count())
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"device=cuda: torch {torch.__version__} sees no CUDA device",
                fix="install a CUDA build of torch and check nvidia-smi / CUDA_VISIBLE_DEVICES, or choose device=cpu",
            )
        return Device("cuda", torch.cuda.device_count())
    if requested == "cpu":
        return Device("cpu", 1)
    raise UserError(f"unknown device {requested!r}", fix="choose device=auto, npu, cuda or cpu")
