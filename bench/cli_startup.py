"""How fast the CLI answers what needs no model: a config error, --help, show and ls, before and after.

    python bench/cli_startup.py [--before REV] [--runs 7]

"Before" is git revision REV (default: the commit before issue 17's work, c978762) unpacked with
``git archive`` into a temporary directory; "after" is this checkout. Each command runs as a fresh
``python -m ...`` process with PYTHONPATH pointing at one tree, the two trees alternating run by run
so both see the same machine load; the first run of each is a warm-up (the page cache, and the
before tree's catalogue building the demo's tiny model) and not counted. Reported per command:
the median wall time and the median CPU time (user + system of the child, from ``getrusage``),
which depends less on other load than wall time does.

The commands, before -> after (what each tree offers for the same question):

* config error: ``train.learnin_rate=1e-4`` -> the same;
* help: ``--help`` (Hydra's config dump) -> ``--help`` (the stages and what they do);
* show: ``+recipe=qwen7b_lora_zero3 --cfg job`` -> ``show qwen7b_lora_zero3``;
* ls: ``python -m npu_recipes.plan.catalogue`` (``make list``) -> ``npu-recipes ls``.

Writes bench/results/cli_startup-<device>.json with the Python and package versions.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BEFORE = "c978762"
COMMANDS = {
    "config_error": (["-m", "npu_recipes", "train.learnin_rate=1e-4"], ["-m", "npu_recipes", "train.learnin_rate=1e-4"]),
    "help": (["-m", "npu_recipes", "--help"], ["-m", "npu_recipes", "--help"]),
    "show": (["-m", "npu_recipes", "+recipe=qwen7b_lora_zero3", "--cfg", "job"], ["-m", "npu_recipes", "show", "qwen7b_lora_zero3"]),
    "ls": (["-m", "npu_recipes.plan.catalogue"], ["-m", "npu_recipes", "ls"]),
}


def _unpack(revision: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", revision], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _timed(tree: Path, arguments: list, workdir: Path, environment: dict) -> tuple:
    """(wall seconds, CPU seconds) of one ``python ARGUMENTS`` run in ``tree``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *arguments], cwd=workdir, env={**environment, "PYTHONPATH": str(tree)},
                            capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in (0, 2):
        raise RuntimeError(f"{arguments} in {tree} exited {result.returncode}: {result.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default=BEFORE, help="git revision measured as 'before'")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command and tree (after one warm-up)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        trees = {"before": _unpack(args.before, scratch / "before"), "after": REPO}
        environment = {**os.environ, "NPU_RECIPES_CACHE": str(scratch / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        environment.pop("PYTHONPATH", None)
        load_before = os.getloadavg()
        results = {}
        for name, argument_lists in COMMANDS.items():
            samples = {"before": [], "after": []}
            for run in range(args.runs + 1):
                for (side, tree), arguments in zip(trees.items(), argument_lists):
                    measured = _timed(tree, arguments, scratch, environment)
                    if run:
                        samples[side].append(measured)
            medians = {side: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s)) for side, s in samples.items()}
            results[name] = {
                "before_wall_s": round(medians["before"][0], 3), "after_wall_s": round(medians["after"][0], 3),
                "before_cpu_s": round(medians["before"][1], 3), "after_cpu_s": round(medians["after"][1], 3),
                "wall_speedup": round(medians["before"][0] / medians["after"][0], 2),
                "before": " ".join(argument_lists[0]), "after": " ".join(argument_lists[1]),
            }
    from npu_recipes.run import manifest

    device_name = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    results_io.write({
        "command": " ".join(["python", "bench/cli_startup.py", *sys.argv[1:]]),
        "device": {"type": "cpu", "name": device_name, "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
        "versions": manifest.package_versions(),
        "before_revision": args.before,
        "after_revision": manifest.git_commit(),
        "runs": args.runs,
        "results": results,
    }, "cli_startup", device_name)


if __name__ == "__main__":
    main()
