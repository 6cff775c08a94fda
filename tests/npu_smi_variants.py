"""Variants of the real npu-smi fixtures, built by editing their text the way other machines print it."""

from __future__ import annotations

from typing import Dict, List

# `npu-smi info` card table: 6 banner/header lines (through the first "+===" border), then 3 lines per card.
_HEADER_LINES = 6
_LINES_PER_CARD = 3
_CELL = 11  # width of one column of `npu-smi info -t topo`


def fewer_cards(info: str, cards: int) -> str:
    """The card table cut after ``cards`` cards."""
    lines = info.splitlines()
    return "\n".join(lines[: _HEADER_LINES + _LINES_PER_CARD * cards]) + "\n"


def with_health(info: str, card: int, health: str) -> str:
    """Card ``card`` reporting ``health`` (the column keeps its width)."""
    lines = info.splitlines()
    row = _HEADER_LINES + _LINES_PER_CARD * card
    lines[row] = lines[row].replace("| OK            |", f"| {health:<14}|", 1)
    return "\n".join(lines) + "\n"


def as_910b4_32gb(info: str) -> str:
    """Every card a 910B4 with 32 GB of HBM."""
    return info.replace("910B3", "910B4").replace("/ 65536", "/ 32768")


def with_processes(info: str, processes: List[Dict]) -> str:
    """The process table npu-smi prints under the card table: one row per process, and a
    "No running processes found" row for each card without one."""
    border = "+===========================+===============+====================================================+"
    lines = [
        "+---------------------------+---------------+----------------------------------------------------+",
        "| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |",
        border,
    ]
    cards = sum(1 for line in info.splitlines()[_HEADER_LINES:] if line.startswith("+==="))
    by_card = {p["npu"]: p for p in processes}
    for card in range(cards):
        if card in by_card:
            p = by_card[card]
            lines.append(f"| {card:<7} {0:<17} | {p['pid']:<13} | {p['name']:<24} | {p['memory_mb']:<23} |")
        else:
            lines.append(f"| {'No running processes found in NPU ' + str(card):<95}|")
        lines.append(border)
    return info + "\n".join(lines) + "\n"


def topology(links: List[List[str]], affinity: List[str], legend_from: str) -> str:
    """A `npu-smi info -t topo` matrix for ``links`` (``X`` on the diagonal) in the fixture's layout and legend."""
    count = len(links)
    lines = [" " * 7 + "".join(f"NPU{i}".ljust(_CELL) for i in range(count)) + "CPU Affinity"]
    for i, row in enumerate(links):
        lines.append(f"NPU{i}".ljust(_CELL) + "".join(cell.ljust(_CELL) for cell in row) + affinity[i])
    legend = legend_from[legend_from.index("\nLegend:"):]
    return "\n".join(lines) + "\n" + legend


PCIE_ONLY_4 = [
    ["X", "PIX", "PXB", "SYS"],
    ["PIX", "X", "PHB", "SYS"],
    ["PXB", "PHB", "X", "SYS"],
    ["SYS", "SYS", "SYS", "X"],
]
