"""Parsers for the device management tools' text: ``npu-smi info``, ``npu-smi info -t topo``,
``nvidia-smi --query-gpu/--query-compute-apps`` (CSV) and ``nvidia-smi topo -m``.

The parsers split on the tools' column separators (``|`` in npu-smi's tables, runs of blanks or tabs
in the topology matrices), not on character positions, so other driver versions' column widths
parse the same. Memory figures are MB as the tools print them.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

_PAIR = re.compile(r"(\d+)\s*/\s*(\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DEVICE_COLUMN = re.compile(r"^(NPU|GPU|NIC)\d+$")


@dataclass
class Chip:
    """One chip as the management tool lists it.

    Attributes:
        index: the tool's device index (npu-smi "NPU", nvidia-smi "index").
        chip: chip number on that card (0 for single-chip cards such as the 910B).
        name: chip name (``910B3``, ``NVIDIA H200``).
        health: npu-smi's Health column (``OK``, ``Warning``, ``Alarm``, ``Critical``); None for nvidia-smi.
        bus_id: PCIe bus id.
        memory_used_mb, memory_total_mb: HBM in use and installed, MB.
    """

    index: int
    chip: int
    name: str
    health: Optional[str]
    bus_id: str
    memory_used_mb: int
    memory_total_mb: int


@dataclass
class Process:
    """A process holding device memory: device index, chip, pid, name, memory in MB."""

    index: int
    chip: int
    pid: int
    name: str
    memory_mb: int


@dataclass
class SmiInfo:
    """What ``npu-smi info`` (or nvidia-smi's queries) report: tool version, chips, processes."""

    version: Optional[str]
    chips: List[Chip] = field(default_factory=list)
    processes: List[Process] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Topology:
    """A topology matrix (``npu-smi info -t topo`` or ``nvidia-smi topo -m``).

    Attributes:
        devices: row names in order (``NPU0``..., ``GPU0``..., NICs included where listed).
        links: ``{row: {column: link}}`` with links such as ``HCCS``, ``NV18``, ``PIX``, ``PXB``,
            ``PHB``, ``NODE``, ``SYS``, ``X`` (self) or ``NA``.
        attributes: ``{row: {column: value}}`` for the non-device columns (``CPU Affinity``, ``NUMA Affinity``).
    """

    devices: List[str]
    links: Dict[str, Dict[str, str]]
    attributes: Dict[str, Dict[str, str]]

    def link(self, a: str, b: str) -> str:
        """The link type between devices ``a`` and ``b``."""
        return self.links[a][b]

    def pairs(self, devices: List[str]) -> List[Tuple[str, str, str]]:
        """``(a, b, link)`` for every unordered pair of distinct ``devices``."""
        return [(a, b, self.link(a, b)) for i, a in enumerate(devices) for b in devices[i + 1:]]

    def to_dict(self) -> dict:
        return asdict(self)


def _cells(line: str) -> List[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _is_border(line: str) -> bool:
    return line.startswith("+")


def parse_npu_smi_info(text: str) -> SmiInfo:
    """Parse ``npu-smi info``: the version banner, the card table (two rows per chip) and, when
    present, the process table that follows it (rows or "No running processes found in NPU N").

    Raises:
        ValueError: the text holds no card table.
    """
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    version_match = re.search(r"Version:\s*(\S+)", text)
    info = SmiInfo(version=version_match.group(1) if version_match else None)
    section = None
    pending: Optional[List[str]] = None
    for line in lines:
        if _is_border(line):
            pending = None
            continue
        cells = _cells(line)
        header = " ".join(cells)
        if "Health" in header and "Name" in header:
            section = "cards"
            continue
        if "Process id" in header:
            section = "processes"
            continue
        if section == "cards":
            if "Bus-Id" in header or "AICore" in header:
                continue
            if pending is None:
                pending = cells
                continue
            first, second = pending, cells
            pending = None
            index, _, name = first[0].partition(" ")
            pairs = _PAIR.findall(second[2]) if len(second) > 2 else []
            used, total = (int(pairs[-1][0]), int(pairs[-1][1])) if pairs else (0, 0)
            info.chips.append(Chip(int(index), int(second[0] or 0), name.strip(), first[1], second[1], used, total))
        elif section == "processes" and len(cells) >= 4 and cells[1].isdigit():
            index, _, chip = cells[0].partition(" ")
            info.processes.append(Process(int(index), int(chip.strip() or 0), int(cells[1]), cells[2], int(cells[3] or 0)))
    if not info.chips:
        raise ValueError("no card table found in the npu-smi info output")
    return info


def parse_topology(text: str) -> Topology:
    """Parse a topology matrix: a header row of device names (then attribute columns such as
    ``CPU Affinity``), one row per device, and a legend that is ignored.

    Raises:
        ValueError: no header row with device columns.
    """
    header: Optional[List[str]] = None
    devices: List[str] = []
    links: Dict[str, Dict[str, str]] = {}
    attributes: Dict[str, Dict[str, str]] = {}
    for raw in _ANSI.sub("", text).splitlines():
        raw = raw.rstrip()
        tokens = [token for token in re.split(r"\s*\t\s*|\s{2,}", raw.strip()) if token]
        if not tokens:
            continue
        if header is None:
            # The header row is indented (rows start with their device name); a one-device matrix has one device column.
            if _DEVICE_COLUMN.match(tokens[0]) and (raw[:1].isspace() or (len(tokens) > 1 and _DEVICE_COLUMN.match(tokens[1]))):
                header = tokens
            continue
        if not _DEVICE_COLUMN.match(tokens[0]):
            if devices:
                break
            continue
        columns = [name for name in header if _DEVICE_COLUMN.match(name)]
        extra = [name for name in header if not _DEVICE_COLUMN.match(name)]
        row, values = tokens[0], tokens[1:]
        devices.append(row)
        links[row] = dict(zip(columns, values[: len(columns)]))
        attributes[row] = dict(zip(extra, values[len(columns):]))
    if header is None:
        raise ValueError("no topology matrix header (NPU0/GPU0 ...) found")
    return Topology(devices, links, attributes)


NVIDIA_GPU_QUERY = "index,name,pci.bus_id,memory.used,memory.total,uuid"
NVIDIA_APPS_QUERY = "gpu_uuid,pid,process_name,used_memory"


def _csv_rows(text: str) -> List[List[str]]:
    return [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(text)) if row]


def _mb(value: str) -> int:
    return int(float(value)) if re.fullmatch(r"[\d.]+", value) else 0


def parse_nvidia_smi(gpus_csv: str, apps_csv: str = "") -> SmiInfo:
    """Parse ``nvidia-smi --query-gpu=index,name,pci.bus_id,memory.used,memory.total,uuid --format=csv,noheader,nounits``
    and ``--query-compute-apps=gpu_uuid,pid,process_name,used_memory`` (same format) into chips and processes.

    Raises:
        ValueError: a row without the queried columns (another driver's output, or not nvidia-smi's).
    """
    info = SmiInfo(version=None)
    index_of_uuid = {}
    for row in _csv_rows(gpus_csv):
        if len(row) != 6 or not row[0].isdigit():
            raise ValueError(f"expected {NVIDIA_GPU_QUERY}, got {', '.join(row)!r}")
        index, name, bus_id, used, total, uuid = row
        info.chips.append(Chip(int(index), 0, name, None, bus_id, _mb(used), _mb(total)))
        index_of_uuid[uuid] = int(index)
    for row in _csv_rows(apps_csv):
        if len(row) != 4 or not row[1].isdigit():
            raise ValueError(f"expected {NVIDIA_APPS_QUERY}, got {', '.join(row)!r}")
        uuid, pid, name, used = row
        info.processes.append(Process(index_of_uuid.get(uuid, -1), 0, int(pid), name, _mb(used)))
    return info
