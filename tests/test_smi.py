"""Parsers of npu-smi and nvidia-smi output, on the real 8 x 910B3 fixtures and variants built from them."""

from __future__ import annotations

import pytest

from npu_recipes.doctor import smi
from tests import npu_smi_variants as variants


def test_real_info_fixture(npu_smi_texts):
    info = smi.parse_npu_smi_info(npu_smi_texts["info"])
    assert info.version == "24.1.rc1.b030"
    assert [chip.index for chip in info.chips] == list(range(8))
    assert {chip.name for chip in info.chips} == {"910B3"} and {chip.health for chip in info.chips} == {"OK"}
    first, last = info.chips[0], info.chips[7]
    assert (first.bus_id, first.memory_used_mb, first.memory_total_mb, first.chip) == ("0000:C1:00.0", 3318, 65536, 0)
    assert (last.bus_id, last.memory_used_mb) == ("0000:42:00.0", 3315)
    assert info.processes == []


def test_real_topology_fixture(npu_smi_texts):
    topology = smi.parse_topology(npu_smi_texts["topo"])
    assert topology.devices == [f"NPU{i}" for i in range(8)]
    assert {link for _, _, link in topology.pairs(topology.devices)} == {"HCCS"}
    assert len(topology.pairs(topology.devices)) == 28
    assert all(topology.link(name, name) == "X" for name in topology.devices)
    affinity = [topology.attributes[name]["CPU Affinity"] for name in topology.devices]
    assert affinity == ["144-167", "144-167", "96-119", "96-119", "0-23", "0-23", "48-71", "48-71"]


@pytest.mark.parametrize("cards", [1, 2, 4])
def test_fewer_cards(npu_smi_texts, cards):
    info = smi.parse_npu_smi_info(variants.fewer_cards(npu_smi_texts["info"], cards))
    assert [chip.index for chip in info.chips] == list(range(cards))
    assert info.chips[-1].bus_id == ["0000:C1:00.0", "0000:C2:00.0", "0000:81:00.0", "0000:82:00.0"][cards - 1]


@pytest.mark.parametrize("health", ["Warning", "Alarm", "Critical"])
def test_a_card_in_bad_health(npu_smi_texts, health):
    info = smi.parse_npu_smi_info(variants.with_health(npu_smi_texts["info"], 2, health))
    assert [chip.health for chip in info.chips] == ["OK", "OK", health, "OK", "OK", "OK", "OK", "OK"]


def test_910b4_with_32gb(npu_smi_texts):
    info = smi.parse_npu_smi_info(variants.as_910b4_32gb(npu_smi_texts["info"]))
    assert {chip.name for chip in info.chips} == {"910B4"}
    assert {chip.memory_total_mb for chip in info.chips} == {32768}
    assert info.chips[0].memory_used_mb == 3318


def test_process_table_under_the_cards(npu_smi_texts):
    text = variants.with_processes(
        npu_smi_texts["info"], [{"npu": 1, "pid": 2012345, "name": "python3.10", "memory_mb": 30012},
                                {"npu": 6, "pid": 77, "name": "mindie_llm", "memory_mb": 512}],
    )
    info = smi.parse_npu_smi_info(text)
    assert len(info.chips) == 8
    assert [(p.index, p.chip, p.pid, p.name, p.memory_mb) for p in info.processes] == [
        (1, 0, 2012345, "python3.10", 30012), (6, 0, 77, "mindie_llm", 512)]


def test_pcie_only_topology(npu_smi_texts):
    text = variants.topology(variants.PCIE_ONLY_4, ["0-23", "0-23", "24-47", "48-71"], npu_smi_texts["topo"])
    topology = smi.parse_topology(text)
    assert topology.devices == ["NPU0", "NPU1", "NPU2", "NPU3"]
    assert [(a, b, link) for a, b, link in topology.pairs(topology.devices)] == [
        ("NPU0", "NPU1", "PIX"), ("NPU0", "NPU2", "PXB"), ("NPU0", "NPU3", "SYS"),
        ("NPU1", "NPU2", "PHB"), ("NPU1", "NPU3", "SYS"), ("NPU2", "NPU3", "SYS")]
    assert topology.attributes["NPU2"] == {"CPU Affinity": "24-47"}


def test_garbage_is_refused():
    with pytest.raises(ValueError, match="no card table"):
        smi.parse_npu_smi_info("npu-smi: command failed\n")
    with pytest.raises(ValueError, match="no topology matrix header"):
        smi.parse_topology("Legend:\n  X = Self\n")


# `nvidia-smi topo -m` of a two-GPU NVLink machine with one NIC, written in nvidia-smi's layout
# (tab-separated, a blank cell before "GPU NUMA ID"); no real capture is available offline.
NVIDIA_TOPO = (
    "\tGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tNV18\tSYS\t0-55,112-167\t0\t\tN/A\n"
    "GPU1\tNV18\t X \tSYS\t0-55,112-167\t0\t\tN/A\n"
    "NIC0\tSYS\tSYS\t X \t\t\t\t\n\n"
    "Legend:\n\n  X    = Self\n  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes\n"
)


def test_nvidia_topology():
    topology = smi.parse_topology(NVIDIA_TOPO)
    assert topology.devices == ["GPU0", "GPU1", "NIC0"]
    assert topology.link("GPU0", "GPU1") == "NV18" and topology.link("GPU1", "NIC0") == "SYS"
    assert topology.attributes["GPU1"] == {"CPU Affinity": "0-55,112-167", "NUMA Affinity": "0", "GPU NUMA ID": "N/A"}


def test_single_device_topology():
    topology = smi.parse_topology("       NPU0       CPU Affinity\nNPU0       X          0-23\n")
    assert topology.devices == ["NPU0"] and topology.pairs(topology.devices) == []
    assert topology.attributes["NPU0"] == {"CPU Affinity": "0-23"}


def test_nvidia_queries():
    gpus = "0, NVIDIA H200, 00000000:19:00.0, 1021, 143771, GPU-aaa\n1, NVIDIA H200, 00000000:3B:00.0, 4, 143771, GPU-bbb\n"
    apps = "GPU-bbb, 4242, /usr/bin/python3, 1010\n"
    info = smi.parse_nvidia_smi(gpus, apps)
    assert [(c.index, c.name, c.memory_used_mb, c.memory_total_mb, c.health) for c in info.chips] == [
        (0, "NVIDIA H200", 1021, 143771, None), (1, "NVIDIA H200", 4, 143771, None)]
    assert [(p.index, p.pid, p.name, p.memory_mb) for p in info.processes] == [(1, 4242, "/usr/bin/python3", 1010)]


def test_nvidia_output_without_the_queried_columns_is_refused():
    with pytest.raises(ValueError, match="expected index,name"):
        smi.parse_nvidia_smi("0, NVIDIA H200, 00000000:19:00.0, 1021, 143771\n")
    with pytest.raises(ValueError, match="expected gpu_uuid,pid"):
        smi.parse_nvidia_smi("", "No running processes found\n")
