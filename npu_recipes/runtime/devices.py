"""How a process uses its device, for Ascend NPUs, CUDA GPUs and the CPU alike.

Stages ask a :class:`Device` for device strings, memory statistics, bf16 support, process groups
and launcher settings instead of branching on the device type themselves. (What is known *about*
device types without one at hand lives with its concern: memory per device type for planning in
:mod:`npu_recipes.plan.targets`, chip peaks in :mod:`npu_recipes.model.flops`, which kernels run
where in :mod:`npu_recipes.model.kernels`, the vendor tools the doctor asks in
:mod:`npu_recipes.doctor.checks`.) The one rule for ``device=auto``
(:func:`auto_type`) and the one reader of the visibility variables (:func:`visibility`) live here,
used by training, serving and the doctor alike.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import logging
import os
import resource
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Tuple

from npu_recipes.errors import UserError

if TYPE_CHECKING:
    import torch

GIB = 1024**3

log = logging.getLogger(__name__)


CANN_SET_ENV = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
CANN_VARIABLES = ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME")
"""Variables CANN's set_env.sh exports; either one set means the environment was sourced."""
HCCL_CONNECT_TIMEOUT_S = 600
"""Default ``HCCL_CONNECT_TIMEOUT`` for NPU workers, in seconds (CANN's own default is 120)."""
_VISIBILITY_VARIABLES = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}
_DEVICE_NOUNS = {"npu": "NPU", "cuda": "CUDA GPU", "cpu": "CPU"}


def _cann_sourced() -> bool:
    return any(os.environ.get(name) for name in CANN_VARIABLES)


def npu_import_error() -> UserError | None:
    """Import torch_npu; return a UserError saying exactly what to install or source instead of raising.

    Three cases: the package is absent (pip install the torch_npu matching this torch); it is present
    but fails to load with CANN's environment not sourced (source ``set_env.sh``); it fails with CANN
    sourced (a torch / torch_npu / CANN version mismatch).
    """
    import torch
    if "torch_npu" in sys.modules:
        return None
    torch_version = torch.__version__.split("+")[0]
    if importlib.util.find_spec("torch_npu") is None:
        return UserError(
            f"device=npu needs the torch_npu package, which is not installed in {sys.executable} (torch {torch.__version__})",
            fix=f"install CANN, `source {CANN_SET_ENV}`, then `pip install torch-npu=={torch_version}` "
            f"(torch_npu X.Y.Z pairs with torch X.Y.Z); or choose device=cuda or device=cpu",
        )
    try:
        importlib.import_module("torch_npu")
    except Exception as error:  # torch_npu raises ImportError, OSError or RuntimeError when CANN is missing
        if not _cann_sourced():
            return UserError(
                f"torch_npu is installed but failed to import ({type(error).__name__}: {error}); CANN's environment is "
                "not sourced (ASCEND_HOME_PATH and ASCEND_TOOLKIT_HOME are unset)",
                fix=f"`source {CANN_SET_ENV}` (or the set_env.sh of your CANN install) in this shell, then rerun",
            )
        return UserError(
            f"torch_npu failed to import ({type(error).__name__}: {error}) with CANN at "
            f"{os.environ.get('ASCEND_HOME_PATH') or os.environ.get('ASCEND_TOOLKIT_HOME')}",
            fix=f"check that torch_npu's version equals torch's ({torch_version}) and that your CANN release supports "
            "it (`pip show torch torch-npu`)",
        )
    return None


def set_aside_unloadable_torch_npu(requested: str) -> None:
    """For a run on ``requested`` (``device=...``) other than an NPU: when torch_npu is installed but cannot
    be imported (CANN's environment not sourced), make ``import torch_npu`` fail fast in this process.

    transformers' ``is_torch_npu_available()`` imports torch_npu whenever it is installed, from module
    imports as common as a model's modeling file, so a broken torch_npu would stop a ``device=cpu``
    run (or a plan) inside transformers. ``sys.modules["torch_npu"] = None`` is Python's own way to
    make a module unimportable (``importlib.util.find_spec`` then answers None, so transformers sees
    no torch_npu). Logs one warning naming the failure. No-op for ``npu`` and ``auto`` (which picks
    the NPU, and its fix, when torch_npu is installed) and where torch_npu is absent or imports.
    """
    if requested in ("npu", "auto") or "torch_npu" in sys.modules or importlib.util.find_spec("torch_npu") is None:
        return
    failure = npu_import_error()
    if failure is None:
        return
    sys.modules["torch_npu"] = None
    log.warning("device=%s: ignoring the installed torch_npu in this run (%s)", requested, failure.message)


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
        import torch
        return getattr(torch, self.type) if self.type != "cpu" else None

    def torch_device(self, local_rank: int = 0) -> torch.device:
        """The ``torch.device`` for a process of local rank ``local_rank`` (``npu:N``, ``cuda:N``, ``cpu``)."""
        import torch
        return torch.device("cpu") if self.type == "cpu" else torch.device(self.type, local_rank)

    @property
    def is_accelerator(self) -> bool:
        """True for NPU and GPU: memory and streams of their own, separate from the host's (False for the CPU)."""
        return self.type != "cpu"

    @property
    def distributed_backend(self) -> str:
        """The process-group backend: hccl (NPU), nccl (CUDA), gloo (CPU)."""
        return {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[self.type]

    @property
    def visibility_variable(self) -> str | None:
        """Environment variable that restricts visible devices, or None for the CPU."""
        return _VISIBILITY_VARIABLES.get(self.type)

    @property
    def deepspeed_accelerator(self) -> str:
        """Value for DeepSpeed's ``DS_ACCELERATOR`` environment variable (its accelerator names equal ours).

        With ``cpu``, DeepSpeed 0.19's CPU accelerator communicates over gloo unless Intel's
        oneccl_bindings_for_pytorch is importable, in which case it picks ccl
        (``deepspeed/accelerator/cpu_accelerator.py``).
        """
        return self.type

    @property
    def ddp_find_unused_parameters(self) -> bool | None:
        """``TrainingArguments.ddp_find_unused_parameters``: False on NPU, None (transformers decides) elsewhere.

        transformers turns the search on for models that are not a ``PreTrainedModel`` (a PEFT
        model, for instance) when gradient checkpointing is off, and DDP's unused-parameter search
        is a known crash on Ascend NPUs (issue 3 asks for it off there).
        """
        return False if self.type == "npu" else None

    def worker_environment(self) -> dict[str, str]:
        """Environment variables every worker process of this device type needs: ``DS_ACCELERATOR``, and
        on NPUs ``HCCL_CONNECT_TIMEOUT`` (seconds HCCL waits for every rank to join a communicator)
        unless already set.

        CANN's default of 120 s is shorter than 8 ranks loading a large model before their first
        collective can take; ms-swift raises it to the :data:`HCCL_CONNECT_TIMEOUT_S` used here.
        """
        environment = {"DS_ACCELERATOR": self.deepspeed_accelerator}
        if self.type == "npu" and "HCCL_CONNECT_TIMEOUT" not in os.environ:
            environment["HCCL_CONNECT_TIMEOUT"] = str(HCCL_CONNECT_TIMEOUT_S)
        return environment

    def runs_fused_adamw(self) -> bool:
        """True when torch's fused AdamW kernel (``aten::_fused_adamw_``, what ``optim=adamw_torch_fused``
        runs) is registered for this device type: CPU and CUDA in torch itself; an NPU only where
        torch_npu registers it for its ``PrivateUse1`` dispatch key. Asked of torch's dispatcher, so an
        optimizer that would fail at its first step is never chosen."""
        import torch

        key = {"cpu": "CPU", "cuda": "CUDA", "npu": "PrivateUse1"}[self.type]
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_adamw_", key))

    def seed(self, seed: int) -> None:
        """Seed Python, NumPy, torch and this device's generators (transformers' ``set_seed``, which
        calls ``torch.npu.manual_seed_all`` once torch_npu is imported, as :func:`resolve` ensures)."""
        from transformers import set_seed

        set_seed(seed)

    def name(self) -> str:
        """Human-readable chip name (e.g. ``Ascend910B3``, ``NVIDIA H200``) or the CPU's architecture."""
        if self.type == "cpu":
            import platform

            return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
        return self.module.get_device_name(0)

    def supports_bf16(self) -> bool:
        """True when bf16 tensors compute natively here: asks ``torch.cuda.is_bf16_supported()`` (Ampere
        or newer) or torch_npu's ``torch.npu.is_bf16_supported()`` (the 910B family; not the 910A), as
        DeepSpeed's NPU accelerator and LLaMA-Factory do; always True on the CPU."""
        if self.module is None:
            return True
        return bool(self.module.is_bf16_supported())

    def total_memory_gib(self) -> float:
        """Memory of one device in GiB (HBM for NPU/GPU, physical RAM for the CPU)."""
        if self.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        return self.module.get_device_properties(0).total_memory / GIB

    def synchronize(self) -> None:
        """Wait for the device's queued work (no-op on CPU): timings read after this include the kernels."""
        if self.module is not None:
            self.module.synchronize()

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

    def init_process_group(self, timeout_s: int, use_deepspeed: bool) -> None:
        """Join the torchrun job this worker belongs to: set the local device, then create the process
        group with :attr:`distributed_backend` and a ``timeout_s``-second collective timeout.

        With DeepSpeed the group is created through ``deepspeed.init_distributed``, so DeepSpeed's own
        communication layer is initialised too; the Trainer (through accelerate) then reuses the group.
        This matters on the CPU, where ``TrainingArguments(use_cpu=True)`` makes accelerate skip
        DeepSpeed's initialisation, and ZeRO would otherwise size its batch for a world of one.
        No-op outside torchrun (no ``WORLD_SIZE`` in the environment) or when already initialised.
        """
        import torch.distributed as dist

        placement = process_placement()
        if "WORLD_SIZE" not in os.environ or dist.is_initialized():
            return
        self.set_current(placement.local_rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=self.distributed_backend, timeout=timeout, auto_mpi_discovery=False)
        else:
            dist.init_process_group(backend=self.distributed_backend, timeout=timeout)

    def sum_over_ranks(self, value: int) -> int:
        """The sum of ``value`` (an int, e.g. tokens) over every process of the job (``value`` outside one).

        A collective in int64 (exact, unlike the float32 of :meth:`gather_over_ranks`): every rank must
        call it at the same point. It reads the result on the host, so call it where a step already
        synchronises (logging, saving), not inside every step.
        """
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return value
        total = torch.tensor([value], dtype=torch.int64, device=self.torch_device(process_placement().local_rank))
        dist.all_reduce(total)
        return int(total.item())

    def gather_over_ranks(self, value: float) -> list[float]:
        """``value`` from every process of the job, in rank order (``[value]`` outside one).

        A collective: every rank must call it at the same point. float32, because HCCL has no
        float64 all-gather on every chip; 7 significant digits are plenty for GiB and seconds.
        """
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [value]
        local = torch.tensor([value], dtype=torch.float32, device=self.torch_device(process_placement().local_rank))
        gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        return [float(tensor.item()) for tensor in gathered]


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocator's out-of-memory error: ``torch.OutOfMemoryError`` (CUDA, and NPU with
    recent torch_npu), a ``RuntimeError`` saying "out of memory" (older torch_npu: "NPU out of
    memory. Tried to allocate ..."), or the host's ``MemoryError``."""
    import torch
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


class Placement(NamedTuple):
    """Where this process sits in a torchrun job: global ``rank``, ``local_rank`` on its node, ``world_size``."""

    rank: int
    local_rank: int
    world_size: int


def process_placement() -> Placement:
    """This process's :class:`Placement`, from the variables torchrun sets (0, 0, 1 outside torchrun)."""
    return Placement(
        int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    )


class Visibility(NamedTuple):
    """What a device type's visibility variable (``ASCEND_RT_VISIBLE_DEVICES``, ``CUDA_VISIBLE_DEVICES``) says.

    Attributes:
        variable: the variable's name (None for the CPU, which has none).
        value: its value as set (None when unset).
        ids: the device ids the runtime will use, in order (None when unset): entries up to the first
            empty or negative one, as CUDA reads the list; an empty value hides every device (``[]``).
        problem: what is wrong with the value (a repeated id, or an entry that is neither a device
            number nor, on CUDA, a ``GPU-``/``MIG-`` UUID), or None.
    """

    variable: Optional[str]
    value: Optional[str]
    ids: Optional[List[str]]
    problem: Optional[str]


def _valid_id(entry: str, device_type: str) -> bool:
    return entry.isdigit() or (device_type == "cuda" and entry.startswith(("GPU-", "MIG-")))


def visibility(device_type: str) -> Visibility:
    """Read ``device_type``'s visibility variable (see :class:`Visibility`)."""
    variable = _VISIBILITY_VARIABLES.get(device_type)
    value = os.environ.get(variable) if variable else None
    if value is None:
        return Visibility(variable, None, None, None)
    entries = [entry.strip() for entry in value.split(",")]
    ids: List[str] = []
    for entry in entries:
        if not entry or entry.startswith("-"):
            break
        ids.append(entry)
    listed = [entry for entry in entries if entry]
    problem = None
    if len(set(listed)) != len(listed) or not all(_valid_id(entry, device_type) for entry in listed):
        problem = f"{variable}={value!r} is not a list of distinct device numbers"
    return Visibility(variable, value, ids, problem)


def visible_device_ids(device_type: str) -> list[str] | None:
    """The device ids the runtime will use under ``device_type``'s visibility variable, or None when it is unset (or CPU).

    ``ASCEND_RT_VISIBLE_DEVICES=0,1,2,3`` gives ``["0", "1", "2", "3"]``; an empty value hides every
    device (``[]``). CUDA stops reading the list at the first negative id, and so does this.
    """
    return visibility(device_type).ids


def _too_few_devices(device_type: str, nproc_per_node: int, visible: int, cause: str) -> UserError:
    noun = _DEVICE_NOUNS[device_type]
    variable = _VISIBILITY_VARIABLES[device_type]
    return UserError(
        f"parallelism.nproc_per_node={nproc_per_node} processes need {nproc_per_node} {noun}s (one each), but "
        f"{visible} {'is' if visible == 1 else 'are'} visible ({cause})",
        fix=f"list at least {nproc_per_node} device ids in {variable} (e.g. {variable}={','.join(map(str, range(nproc_per_node)))}), "
        f"or pass parallelism.nproc_per_node={max(visible, 1)}",
    )


def resolve_for_processes(requested: str, nproc_per_node: int) -> Device:
    """Resolve ``device=requested`` for ``nproc_per_node`` processes on this node, one device each.

    The visibility variable is checked before torch_npu is imported, so a contradiction between
    it and ``nproc_per_node`` is reported even on a machine without the device's runtime. CPU
    processes share the host and are not limited.

    Raises:
        UserError: more processes than visible devices (names both numbers and the variable), or
            the device's runtime is missing (see :func:`resolve`).
    """
    listed = visible_device_ids(requested)
    if listed is not None and nproc_per_node > len(listed):
        variable = _VISIBILITY_VARIABLES[requested]
        raise _too_few_devices(requested, nproc_per_node, len(listed), f"{variable}={os.environ[variable]}")
    device = resolve(requested)
    if device.type != "cpu" and nproc_per_node > device.count:
        variable = device.visibility_variable
        setting = f"{variable}={os.environ[variable]}" if variable in os.environ else f"{variable} is unset"
        raise _too_few_devices(device.type, nproc_per_node, device.count, f"{device.count} on this machine, {setting}")
    return device


def _torch_sees_cuda() -> bool:
    # A "+cpu" wheel has no CUDA: answering without importing torch keeps a config or data mistake
    # on a CPU machine a one-second answer.
    try:
        if "+cpu" in metadata.version("torch"):
            return False
    except metadata.PackageNotFoundError:
        pass
    import torch

    return torch.cuda.is_available()


def auto_type() -> Tuple[str, str]:
    """The one rule for ``device=auto``: the device type this machine is for, and why.

    ``npu`` when torch_npu is installed, npu-smi is on PATH or CANN's environment is set (so an
    Ascend machine whose software is broken gets the exact fix, instead of training on its CPU);
    else ``cuda`` when torch sees a GPU or nvidia-smi is on PATH; else ``cpu``.
    """
    npu_signs = [sign for sign, present in (
        ("torch_npu is installed", importlib.util.find_spec("torch_npu") is not None),
        ("npu-smi is on PATH", shutil.which("npu-smi") is not None),
        ("CANN's environment is set", _cann_sourced()),
    ) if present]
    if npu_signs:
        return "npu", "device=auto: " + ", ".join(npu_signs)
    if shutil.which("nvidia-smi") or _torch_sees_cuda():
        return "cuda", "device=auto: nvidia-smi is on PATH or torch sees a CUDA GPU"
    return "cpu", "device=auto: no NPU or CUDA GPU found"


def name_deepspeed_accelerator(requested: str) -> None:
    """Set DeepSpeed's ``DS_ACCELERATOR=cpu`` for this process (unless set) when ``requested`` means
    the CPU here (``auto`` by :func:`auto_type`).

    transformers imports DeepSpeed whenever it is installed, also in runs that never use it, and
    DeepSpeed then guesses its accelerator, warning "Setting accelerator to CPU" when it finds none;
    naming it answers the question before it is asked. NPUs and GPUs are left to DeepSpeed's own
    detection, which is silent there and would fail on ``DS_ACCELERATOR=npu`` without torch_npu
    before the device check could name the fix. Workers get the variable from their launcher.
    """
    if (auto_type()[0] if requested == "auto" else requested) == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve(requested: str) -> Device:
    """Turn ``device=auto|npu|cuda|cpu`` into a :class:`Device` (``auto`` by :func:`auto_type`).

    Raises:
        UserError: the device type asked for, or the one ``auto`` found signs of, cannot run here
            (names the package to install or the environment to source).
    """
    if requested == "auto":
        requested = auto_type()[0]
    if requested == "cpu":
        return Device("cpu", 1)
    import torch

    if requested == "npu":
        error = npu_import_error()
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
    raise UserError(f"unknown device {requested!r}", fix="choose device=auto, npu, cuda or cpu")
