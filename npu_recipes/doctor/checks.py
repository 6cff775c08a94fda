"""The checks behind ``stage=doctor``: software, devices, visibility, collective settings, interconnect.

Each check yields a :class:`Check` with a status (``ok``, ``warn``, ``fail``, ``skip``), a short detail
and, for ``warn``/``fail``, a one-line fix. :func:`diagnose` runs them for the device type a run would
use (``device=auto`` looks for Ascend signs first, then NVIDIA ones, then settles on the CPU) and
returns a :class:`Report`; nothing is written anywhere.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional, Tuple

from npu_recipes.config.schema import ParallelismConfig
from npu_recipes.doctor import smi
from npu_recipes.errors import UserError
from npu_recipes.runtime import devices

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
SET_ENV = f"source {devices.CANN_SET_ENV}"
TOOL_TIMEOUT_S = 60
MATMUL_SIZE = 256
# Collective-library variables whose values must be integers (seconds or MB), per CANN's and NCCL's docs.
_INTEGER_VARIABLES = {
    "npu": ("HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "HCCL_BUFFSIZE"),
    "cuda": ("NCCL_TIMEOUT", "NCCL_BUFFSIZE"),
}
_COLLECTIVE_PREFIX = {"npu": "HCCL_", "cuda": "NCCL_"}
_HEALTH_WARN = ("Warning",)
_AFFINITY_COLUMNS = ("NUMA Affinity", "CPU Affinity")
"""Topology columns naming a device's NUMA node or its CPUs, the more precise first (nvidia-smi prints both)."""
_BIND_CPUS = {"npu": "export CPU_AFFINITY_CONF=1 (torch_npu binds each process to its card's cores)",
              "cuda": "start each process under numactl --cpunodebind=<its GPU's node>"}

PlannedPeak = Callable[[str, float], float]
"""The planned peak memory of one device, in GiB, for a device type (``npu``, ``cuda``) and a card's
memory in GiB (see :func:`npu_recipes.plan.planner.make`); raises UserError when it cannot be planned."""


@dataclass
class Check:
    """One line of the doctor's table: ``name``, ``status`` (ok|warn|fail|skip), ``detail``, ``fix`` (warn/fail)."""

    name: str
    status: str
    detail: str
    fix: Optional[str] = None


@dataclass
class Report:
    """All checks for one device type, plus what the management tools reported (for ``doctor.format=json``)."""

    device: str
    reason: str
    checks: List[Check] = field(default_factory=list)
    tools: Dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> List[Check]:
        return [check for check in self.checks if check.status == FAIL]

    def add(self, name: str, status: str, detail: str, fix: Optional[str] = None) -> None:
        self.checks.append(Check(name, status, detail, fix))

    def to_dict(self) -> Dict[str, Any]:
        return {"device": self.device, "reason": self.reason, "ok": not self.failed,
                "checks": [asdict(check) for check in self.checks], "tools": self.tools}


def target_device(requested: str) -> Tuple[str, str]:
    """The device type to check and why: ``device=npu|cuda|cpu`` as given; ``auto`` by the rule every
    stage uses (:func:`npu_recipes.runtime.devices.auto_type`)."""
    if requested != "auto":
        return requested, f"device={requested}"
    return devices.auto_type()


def _base_version(version: str) -> str:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return ".".join(part or "0" for part in match.groups()) if match else version


def _installed(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _run_tool(*argv: str) -> Tuple[Optional[str], Optional[str]]:
    """(stdout, None) when the tool ran and succeeded, else (None, why)."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"`{' '.join(argv)}` could not run: {error}"
    if result.returncode != 0:
        return None, f"`{' '.join(argv)}` exited {result.returncode}: {(result.stderr or result.stdout).strip()[:200]}"
    return result.stdout, None


def _check_software(report: Report) -> None:
    import torch
    report.add("python", OK, platform.python_version())
    report.add("torch", OK, torch.__version__)
    if report.device == "npu":
        torch_base = _base_version(torch.__version__)
        npu_version = _installed("torch-npu") or _installed("torch_npu")
        if npu_version is None:
            report.add("torch_npu", FAIL, "not installed", f"pip install torch-npu=={torch_base} (it must match torch {torch_base})")
        elif _base_version(npu_version) != torch_base:
            report.add("torch_npu", FAIL, f"{npu_version} does not pair with torch {torch.__version__}",
                       f"install the matching pair: pip install torch=={_base_version(npu_version)} or torch-npu=={torch_base}")
        else:
            report.add("torch_npu", OK, f"{npu_version} pairs with torch {torch_base}")
        _check_cann(report)
        if npu_version is not None:
            failure = devices.npu_import_error()
            report.add("import torch_npu", FAIL if failure else OK, failure.message if failure else "imports",
                       failure.fix if failure else None)
    elif report.device == "cuda":
        built = torch.version.cuda
        report.add("torch CUDA build", OK if built else FAIL, built or f"torch {torch.__version__} is a CPU-only build",
                   None if built else "install a CUDA build of torch (see pytorch.org for the wheel matching your driver)")


def _check_cann(report: Report) -> None:
    values = {name: os.environ.get(name) for name in devices.CANN_VARIABLES if os.environ.get(name)}
    if not values:
        report.add("CANN environment", FAIL, f"{' and '.join(devices.CANN_VARIABLES)} are unset", SET_ENV)
        return
    missing = [f"{name}={path}" for name, path in values.items() if not os.path.isdir(path)]
    if missing:
        report.add("CANN environment", FAIL, f"set but not present: {', '.join(missing)}",
                   f"install CANN there or {SET_ENV} from the installed toolkit")
    else:
        report.add("CANN environment", OK, ", ".join(f"{name}={path}" for name, path in values.items()))


def _resolve(report: Report) -> Optional[devices.Device]:
    try:
        device = devices.resolve(report.device)
    except UserError as error:
        report.add("devices", FAIL, error.message, error.fix)
        return None
    detail = f"{device.count} x {device.name()}" if device.is_accelerator else device.name()
    report.add("devices", OK, detail)
    return device


def _check_compute(report: Report, device: devices.Device) -> None:
    """Allocate, multiply and compare with the CPU on every visible device; then a bf16 matmul on the first."""
    import torch
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator)
    expected = a @ b
    for index in range(device.count):
        target = device.torch_device(index)
        try:
            product = (a.to(target) @ b.to(target)).cpu()
            error = float((product - expected).abs().max() / expected.abs().max())
        except Exception as failure:  # any driver/runtime error is the finding itself
            report.add(f"{target} matmul", FAIL, f"{type(failure).__name__}: {failure}"[:200],
                       f"check the device with the vendor tool; hide it with {device.visibility_variable or 'the visibility variable'}")
            continue
        # TF32/HF32 matmuls round inputs to 10 mantissa bits: a relative error near 1e-3 is expected.
        good = error < 1e-2
        report.add(f"{target} matmul", OK if good else FAIL, f"{MATMUL_SIZE}x{MATMUL_SIZE} fp32, max relative error {error:.1e}",
                   None if good else "the device computes wrong results: check driver and firmware versions")
    target = device.torch_device(0)
    try:
        product = (a.to(target, torch.bfloat16) @ b.to(target, torch.bfloat16)).float().cpu()
        error = float((product - expected).abs().max() / expected.abs().max())
        works = device.supports_bf16() and error < 5e-2
        detail = f"bf16 matmul max relative error {error:.1e}"
    except Exception as failure:
        works, detail = False, f"bf16 matmul failed: {type(failure).__name__}: {failure}"[:200]
    report.add("bf16", OK if works else WARN, detail,
               None if works else "train with model.torch_dtype=float16 or float32 on this device")


def _check_visibility(report: Report, nproc_per_node: int, device: Optional[devices.Device], chips: Optional[int]) -> None:
    variable, raw, ids, problem = devices.visibility(report.device)
    wanted = nproc_per_node
    if variable is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        good = wanted <= cores
        report.add("processes per node", OK if good else WARN, f"nproc_per_node={wanted}, {cores} usable cores",
                   None if good else f"pass parallelism.nproc_per_node={cores} or fewer")
        return
    if problem is not None:
        report.add("visible devices", FAIL, problem,
                   f"export {variable}=0,1,... (comma-separated, no repeats)")
        return
    if ids is not None and chips is not None and any(item.isdigit() and int(item) >= chips for item in ids):
        report.add("visible devices", FAIL, f"{variable}={raw} names devices this machine lacks (it has {chips})",
                   f"export {variable} with numbers below {chips}")
        return
    if ids is not None:
        visible, source = len(ids), f"{variable}={raw}"
    elif device is not None:
        visible, source = device.count, f"{variable} unset, torch sees {device.count}"
    elif chips is not None:
        visible, source = chips, f"{variable} unset, the management tool lists {chips}"
    else:
        report.add("visible devices", SKIP, f"{variable} unset and no device could be counted")
        return
    good = wanted <= visible
    report.add("visible devices", OK if good else FAIL, f"{source}; parallelism.nproc_per_node={wanted}",
               None if good else f"pass parallelism.nproc_per_node={visible} or fewer, or export {variable} with {wanted} devices")


def _check_collective_settings(report: Report, nnodes: int) -> None:
    prefix = _COLLECTIVE_PREFIX.get(report.device)
    if prefix is None:
        return
    name = f"{prefix.rstrip('_')} settings"
    settings = {key: value for key, value in sorted(os.environ.items()) if key.startswith(prefix)}
    bad = [key for key in _INTEGER_VARIABLES[report.device] if key in settings and not settings[key].strip().isdigit()]
    if bad:
        report.add(name, FAIL, ", ".join(f"{key}={settings[key]!r}" for key in bad) + " must be whole numbers",
                   f"export {bad[0]}=<integer> or unset it")
        return
    detail = ", ".join(f"{key}={value}" for key, value in settings.items()) or "none set (library defaults)"
    if report.device == "npu" and nnodes > 1 and not (settings.keys() & {"HCCL_IF_IP", "HCCL_SOCKET_IFNAME"}):
        report.add(name, WARN, detail + f"; {nnodes} nodes and no HCCL_IF_IP/HCCL_SOCKET_IFNAME",
                   "export HCCL_SOCKET_IFNAME=<the interface the nodes reach each other on>")
        return
    report.add(name, OK, detail)


def _used_indices(nproc_per_node: int, report: Report, chips: List[smi.Chip]) -> List[int]:
    """Tool indices of the chips a run would use: the first nproc_per_node visible ones."""
    ids = devices.visibility(report.device).ids
    candidates = [int(item) for item in ids if item.isdigit()] if ids is not None else [chip.index for chip in chips]
    return candidates[:nproc_per_node]


def _check_memory_in_use(report: Report, info: smi.SmiInfo, used: List[int], tool: str, warn_fraction: float,
                         planned_peak: Optional[PlannedPeak]) -> None:
    """Memory already in use on the cards the run would use: more than ``warn_fraction`` of a card
    warns ("memory in use"); less free than the run's planned peak per device fails ("planned peak").
    ``tool``'s MB are MiB (npu-smi shows 65536 for a 64 GB card), so 1024 make a GiB."""
    chips = [chip for chip in info.chips if chip.index in used and chip.memory_total_mb > 0]
    if not chips:
        report.add("memory in use", SKIP, f"{tool} lists no memory for the devices this run would use")
        return
    hide = devices.visibility(report.device).variable or "the visibility variable"
    busy = [chip for chip in chips if chip.memory_used_mb > warn_fraction * chip.memory_total_mb]
    shares = ", ".join(f"card {chip.index} {chip.memory_used_mb}/{chip.memory_total_mb} MB ({chip.memory_used_mb / chip.memory_total_mb:.0%})"
                       for chip in (busy or chips))
    if busy:
        report.add("memory in use", WARN, f"in use before the run, above doctor.memory_used_warn={warn_fraction:g}: {shares}",
                   f"free those cards (`{tool}` lists what holds them), or choose other cards with {hide}")
    else:
        report.add("memory in use", OK, shares)
    if planned_peak is None:
        return
    try:
        demand = planned_peak(report.device, chips[0].memory_total_mb / 1024)
    except UserError as error:
        report.add("planned peak", SKIP, f"not planned: {error.message}")
        return
    tightest = min(chips, key=lambda chip: chip.memory_total_mb - chip.memory_used_mb)
    free_gib = (tightest.memory_total_mb - tightest.memory_used_mb) / 1024
    fits = demand <= free_gib
    report.add("planned peak", OK if fits else FAIL,
               f"{demand:.1f} GiB per device (stage=plan's estimate) "
               + (f"fits the {free_gib:.1f} GiB free on card {tightest.index}" if fits else
                  f"no longer fits card {tightest.index}: {tightest.memory_used_mb}/{tightest.memory_total_mb} MB in use, "
                  f"{free_gib:.1f} GiB free"),
               None if fits else f"free card {tightest.index} (`{tool}` lists what holds it), choose other cards with {hide}, "
               "or a setting that needs less (same command plus stage=plan)")


def _check_chips(report: Report, info: smi.SmiInfo, used: List[int], tool: str) -> None:
    names = sorted({chip.name for chip in info.chips})
    report.add(f"{tool} chips", OK, f"{len(info.chips)} x {', '.join(names)}" + (f" ({tool} {info.version})" if info.version else ""))
    for chip in info.chips:
        if chip.health is None or chip.health == "OK":
            continue
        status = WARN if chip.health in _HEALTH_WARN else FAIL
        report.add(f"health {report.device}{chip.index}", status, f"{chip.name} chip {chip.chip} reports {chip.health}",
                   f"inspect it with `npu-smi info -t health -i {chip.index}`; hide it with ASCEND_RT_VISIBLE_DEVICES")
    memory = ", ".join(f"{chip.index}: {chip.memory_used_mb}/{chip.memory_total_mb}" for chip in info.chips)
    report.add("HBM used/total MB", OK, memory)
    busy = [process for process in info.processes if process.index in used]
    if busy:
        listed = ", ".join(f"pid {p.pid} {p.name} on {p.index} ({p.memory_mb} MB)" for p in busy)
        report.add("processes", WARN, listed, "stop those processes or choose other devices with the visibility variable")
    else:
        report.add("processes", OK, f"{len(info.processes)} process(es), none on the devices this run would use")


_FAST_LINKS = re.compile(r"^(HCCS.*|NV\d+|SIO)$")


def _check_topology(report: Report, argv: Tuple[str, ...], key: str, used: List[int], prefix: str) -> None:
    """Run the topology command ``argv``, keep its parse under ``report.tools[key]``, and judge the links
    between the devices this run would use (``prefix`` + tool index: ``NPU0``, ``GPU3``)."""
    command = " ".join(argv)
    text, why = _run_tool(*argv)
    if text is None:
        report.add("interconnect", WARN, why, f"run `{command}` by hand")
        return
    try:
        topology = smi.parse_topology(text)
    except ValueError as error:
        report.add("interconnect", WARN, f"unreadable `{command}` output: {error}", f"run `{command}` by hand")
        return
    report.tools[key] = topology.to_dict()
    names = [f"{prefix}{index}" for index in used if f"{prefix}{index}" in topology.links]
    slow = [(a, b, link) for a, b, link in topology.pairs(names) if not _FAST_LINKS.match(link)]
    kinds = sorted({link for _, _, link in topology.pairs(topology.devices)})
    detail = f"links among all: {', '.join(kinds) or 'none'}"
    _check_affinity(report, topology, names)
    if slow:
        shown = ", ".join(f"{a}-{b} {link}" for a, b, link in slow[:6]) + (" ..." if len(slow) > 6 else "")
        report.add("interconnect", WARN, f"PCIe/host paths between devices this run would use: {shown}",
                   "choose devices joined by HCCS/NVLink with the visibility variable, or expect slower collectives")
    else:
        report.add("interconnect", OK, detail)


def _check_affinity(report: Report, topology: smi.Topology, names: List[str]) -> None:
    """The NUMA nodes (or CPU sets) the devices this run would use are attached to: one for all is
    ok; several warn, since a process whose threads run on another node's CPUs reaches its device
    and its host memory across the inter-socket link."""
    column = next((c for c in _AFFINITY_COLUMNS if any(c in topology.attributes.get(n, {}) for n in names)), None)
    if column is None:
        report.add("CPU affinity", SKIP, "the topology lists no CPU affinity")
        return
    affinity = {name: topology.attributes.get(name, {}).get(column, "?") for name in names}
    groups: Dict[str, List[str]] = {}
    for name, value in affinity.items():
        groups.setdefault(value, []).append(name)
    detail = f"{column}: " + ", ".join(f"{name} {value}" for name, value in affinity.items())
    if len(groups) <= 1:
        report.add("CPU affinity", OK, detail + (" (one node)" if groups else ""))
        return
    bind = os.environ.get("CPU_AFFINITY_CONF") if report.device == "npu" else None
    if bind and bind.strip() not in ("", "0"):
        report.add("CPU affinity", OK, f"{detail}; each process is bound to its card's cores (CPU_AFFINITY_CONF={bind})")
        return
    same = max(groups.values(), key=len)
    hide = devices.visibility(report.device).variable or "the visibility variable"
    report.add("CPU affinity", WARN,
               f"the devices this run would use are attached to {len(groups)} different NUMA nodes ({detail})",
               f"{_BIND_CPUS.get(report.device, 'bind each process to its device node CPUs')}, or use devices of one node "
               f"(e.g. {hide}={','.join(name[3:] for name in same)})")


def _check_npu_smi(report: Report, nproc_per_node: int, warn_fraction: float, planned_peak: Optional[PlannedPeak]) -> Optional[int]:
    if shutil.which("npu-smi") is None:
        report.add("npu-smi", WARN, "not on PATH: chips, health and interconnect not checked",
                   "add the driver's tools to PATH (e.g. /usr/local/Ascend/driver/tools)")
        return None
    text, why = _run_tool("npu-smi", "info")
    if text is None:
        report.add("npu-smi", FAIL, why, "check the Ascend driver installation (`npu-smi info` must work)")
        return None
    try:
        info = smi.parse_npu_smi_info(text)
    except ValueError as error:
        report.add("npu-smi", FAIL, f"unreadable `npu-smi info` output: {error}", "run `npu-smi info` by hand and check the driver")
        return None
    report.tools["npu_smi_info"] = info.to_dict()
    used = _used_indices(nproc_per_node, report, info.chips)
    _check_chips(report, info, used, "npu-smi")
    _check_memory_in_use(report, info, used, "npu-smi", warn_fraction, planned_peak)
    _check_topology(report, ("npu-smi", "info", "-t", "topo"), "npu_smi_topo", used, "NPU")
    return len(info.chips)


def _check_nvidia_smi(report: Report, nproc_per_node: int, warn_fraction: float, planned_peak: Optional[PlannedPeak]) -> Optional[int]:
    if shutil.which("nvidia-smi") is None:
        report.add("nvidia-smi", WARN, "not on PATH: memory, processes and interconnect not checked",
                   "install the NVIDIA driver utilities (nvidia-smi)")
        return None
    gpus, why = _run_tool("nvidia-smi", f"--query-gpu={smi.NVIDIA_GPU_QUERY}", "--format=csv,noheader,nounits")
    if gpus is None:
        report.add("nvidia-smi", FAIL, why, "check the NVIDIA driver (`nvidia-smi` must work)")
        return None
    apps, _ = _run_tool("nvidia-smi", f"--query-compute-apps={smi.NVIDIA_APPS_QUERY}", "--format=csv,noheader,nounits")
    try:
        info = smi.parse_nvidia_smi(gpus, apps or "")
    except ValueError as error:
        report.add("nvidia-smi", FAIL, f"unreadable `nvidia-smi --query-gpu` output: {error}",
                   "run `nvidia-smi` by hand and check the driver")
        return None
    report.tools["nvidia_smi"] = info.to_dict()
    used = _used_indices(nproc_per_node, report, info.chips)
    _check_chips(report, info, used, "nvidia-smi")
    _check_memory_in_use(report, info, used, "nvidia-smi", warn_fraction, planned_peak)
    _check_topology(report, ("nvidia-smi", "topo", "-m"), "nvidia_smi_topo", used, "GPU")
    return len(info.chips)


MASTER_CONNECT_TIMEOUT_S = 3.0
"""How long the doctor waits for a TCP connection to ``master_addr:master_port`` (s)."""


def check_master_port(report: Report, parallelism: ParallelismConfig) -> None:
    """Several nodes: can this node open a TCP connection to ``master_addr:master_port``, where torchrun's
    rendezvous meets? A listener there (a node's rendezvous already up) or a refusal (the host answered;
    nothing listens until the first node starts) is fine; no name resolution, a timeout or no route fails."""
    parallel = parallelism
    if parallel.nnodes <= 1:
        return
    name = "master port"
    if parallel.master_port is None:
        report.add(name, FAIL, f"{parallel.nnodes} nodes and no parallelism.master_port",
                   "pass parallelism.master_port=<free port> (or export MASTER_PORT), the same on every node")
        return
    endpoint = f"{parallel.master_addr}:{parallel.master_port}"
    try:
        with socket.create_connection((parallel.master_addr, parallel.master_port), timeout=MASTER_CONNECT_TIMEOUT_S):
            report.add(name, OK, f"{endpoint} accepts connections (a node's rendezvous is up)")
    except ConnectionRefusedError:
        report.add(name, OK, f"{parallel.master_addr} answers; nothing listens on port {parallel.master_port} yet "
                   "(the first node to start opens it)")
    except socket.gaierror as error:
        report.add(name, FAIL, f"cannot resolve parallelism.master_addr={parallel.master_addr}: {error.strerror}",
                   "pass node 0's IP address or a name every node resolves as parallelism.master_addr (or MASTER_ADDR)")
    except OSError as error:
        why = "timed out" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__)
        report.add(name, FAIL, f"{endpoint} is unreachable from this node ({why} after at most {MASTER_CONNECT_TIMEOUT_S:g} s)",
                   f"open TCP port {parallel.master_port} between the nodes (firewall, security group) and check "
                   "that master_addr is an address of one of the job's nodes on the network they share")


def _check_host(report: Report) -> None:
    import psutil

    memory = psutil.virtual_memory()
    report.add("CPU cores", OK, f"{os.cpu_count()} ({platform.machine()})")
    report.add("memory", OK, f"{memory.total / devices.GIB:.1f} GiB total, {memory.available / devices.GIB:.1f} GiB available")


def diagnose(device: str, parallelism: ParallelismConfig, memory_used_warn: float = 0.1,
             planned_peak: Optional[PlannedPeak] = None) -> Report:
    """Run every check for the device type ``device`` points at, for a run with ``parallelism``;
    never raises for what it finds.

    Args:
        memory_used_warn: warn when a card the run would use has more than this fraction of its memory in use.
        planned_peak: the run's planned peak per device (:data:`PlannedPeak`), compared with the free memory.
    """
    report = Report(*target_device(device))
    _check_software(report)
    chips = None
    if report.device == "npu":
        chips = _check_npu_smi(report, parallelism.nproc_per_node, memory_used_warn, planned_peak)
    elif report.device == "cuda":
        chips = _check_nvidia_smi(report, parallelism.nproc_per_node, memory_used_warn, planned_peak)
    resolved = _resolve(report)
    if resolved is not None:
        _check_compute(report, resolved)
    else:
        report.add("matmul", SKIP, "no usable device to compute on")
    _check_visibility(report, parallelism.nproc_per_node, resolved, chips)
    _check_collective_settings(report, parallelism.nnodes)
    check_master_port(report, parallelism)
    _check_host(report)
    return report
