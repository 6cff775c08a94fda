"""Writing a benchmark's JSON record to bench/results/ (shared by the scripts in bench/)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write(record: dict, benchmark: str, device_name: str, tag: str = "", timestamp: bool = False) -> Path:
    """Write ``record`` (with ``benchmark`` and the date added in front) as
    ``bench/results/<benchmark>-<device>[-<tag>][-<time>].json``; print its ``results``; return the path."""
    record = {"benchmark": benchmark, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), **record}
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    parts = [benchmark, device] + ([tag] if tag else []) + ([dt.datetime.now().strftime("%Y%m%d-%H%M%S")] if timestamp else [])
    path = RESULTS / ("-".join(parts) + ".json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"], indent=2))
    print(f"written to {path}")
    return path
