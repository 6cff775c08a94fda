"""docs/troubleshooting.md is true: every row of its table is a case run here through the real CLI.

Each row names a case id, the message the user sees and the fix, with ``<...>`` placeholders for
the parts that vary (paths, numbers). For every row, the case function of the same id below makes
that mistake for real (the cheapest stage and settings that reach the error, the tiny model, a few
rows), and the test checks: the exit status (2 unless the case says otherwise), exactly one
``npu_recipes: error:`` block with the documented message and ``fix:`` line, no traceback, and
that no run directory or other output is left behind. To document a new case, add a table row
and a function registered with ``@case("its-id")``; a test fails while either lacks the other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from tests.helpers import NPU_SMI_FIXTURES, REPO, run_cli, run_faulty_cli, run_in_process

DOC = REPO / "docs" / "troubleshooting.md"
GOOD_ROW = {"input": "What is 2 + 2?", "output": "2 + 2 = 4", "answer": "4"}
# The demo_math option's column mapping (input / output / answer) over a local file.
DEMO_MAPPING = ["dataset=demo_math", "dataset.builder=null"]


@dataclass
class Outcome:
    """What a case produced: the finished CLI process, and paths that must not exist afterwards."""

    result: subprocess.CompletedProcess
    absent: List[Path] = field(default_factory=list)


@dataclass
class Case:
    run: Callable[["Workspace"], Outcome]
    exit_status: int = 2
    doctor_check: Optional[str] = None


CASES: Dict[str, Case] = {}


def case(case_id: str, exit_status: int = 2, doctor_check: Optional[str] = None):
    """Register the function that reproduces the table row ``case_id`` (a finding of the doctor's
    check ``doctor_check``, when given)."""

    def register(function):
        CASES[case_id] = Case(function, exit_status, doctor_check)
        return function

    return register


@dataclass
class Workspace:
    """A case's temporary directory plus the session's shared artefacts."""

    path: Path
    tiny_model: Path
    adapters: Dict[str, Path]
    shared: Path
    """A directory the module's cases share (a trained run made once, the doctor's output)."""

    def rows(self, rows, name: str = "rows.jsonl") -> Path:
        """Write ``rows`` (dicts as JSON objects, strings as they are) one per line."""
        path = self.path / name
        path.write_text("".join((json.dumps(row) if isinstance(row, dict) else row) + "\n" for row in rows))
        return path

    def train(self, *args: str) -> Outcome:
        """The train stage on the CPU with ``args``; its run directory must not appear."""
        run = self.path / "run"
        return Outcome(run_cli("device=cpu", "train.max_steps=1", f"output_dir={run}", *args), [run])

    def train_on(self, path: Path, *args: str) -> Outcome:
        return self.train(*DEMO_MAPPING, f"dataset.path={path}", *args)

    def merge(self, adapters: str, *args: str) -> Outcome:
        target = self.path / "merged"
        return Outcome(run_cli("device=cpu", "stage=merge", f"adapters={adapters}", f"merge.output_dir={target}", *args), [target])

    def with_recipe(self, text: str, *args: str) -> subprocess.CompletedProcess:
        """The CLI of a copy of npu_recipes whose recipes/ also holds ``zz_broken.yaml`` with ``text``,
        run with ``+recipe=zz_broken`` (or ``args``). The copy keeps the broken file away from tests
        that read every recipe of the checkout at the same time."""
        project = self.path / "project"
        if not project.is_dir():
            for name in ("npu_recipes", "conf", "recipes"):
                shutil.copytree(REPO / name, project / name)
        (project / "recipes" / "zz_broken.yaml").write_text(text)
        return run_cli(*(args or ("+recipe=zz_broken", "device=cpu")), cwd=project, env={"PYTHONPATH": str(project)})


def unwritable_dir(workspace: Workspace) -> Path:
    """A directory in which this process can create nothing: a read-only (0o500) directory, or for
    root, whom permission bits do not stop, sysfs's top level."""
    if os.geteuid() == 0:
        return Path("/sys")
    directory = workspace.path / "read-only"
    directory.mkdir()
    directory.chmod(0o500)
    return directory


# --- data files ---------------------------------------------------------------------------------


@case("malformed-jsonl")
def _(ws: Workspace) -> Outcome:
    return ws.train_on(ws.rows([GOOD_ROW, GOOD_ROW, '{"input": "q', GOOD_ROW]))


@case("malformed-json-array")
def _(ws: Workspace) -> Outcome:
    path = ws.path / "rows.json"
    path.write_text(json.dumps([GOOD_ROW] * 3, indent=2).replace("},\n  {", "}\n  {", 1))
    return ws.train_on(path)


@case("jsonl-line-not-an-object")
def _(ws: Workspace) -> Outcome:
    return ws.train_on(ws.rows([GOOD_ROW, "[1, 2]"]))


@case("not-utf8")
def _(ws: Workspace) -> Outcome:
    path = ws.path / "rows.jsonl"
    path.write_bytes((json.dumps(GOOD_ROW) + "\n").encode() + '{"input": "caf\u00e9", "output": "o", "answer": "1"}\n'.encode("latin-1"))
    return ws.train_on(path)


@case("empty-data-file")
def _(ws: Workspace) -> Outcome:
    return ws.train_on(ws.rows(["", ""]))


@case("missing-data-file")
def _(ws: Workspace) -> Outcome:
    return ws.train("dataset=local", f"dataset.path={ws.path / 'nope.jsonl'}")


@case("column-not-in-file")
def _(ws: Workspace) -> Outcome:
    return ws.train_on(ws.rows([{"question": "2+2?", "answer": "4"}]))


@case("columns-in-no-known-layout")
def _(ws: Workspace) -> Outcome:
    return ws.train("dataset=local", f"dataset.path={ws.rows([{'prompt_text': '2+2?', 'reply_text': '4'}])}")


@case("field-missing")
def _(ws: Workspace) -> Outcome:
    return ws.train_on(ws.rows([GOOD_ROW, {"input": "q", "output": "o"}]))


@case("field-empty")
def _(ws: Workspace) -> Outcome:
    return ws.train_on(ws.rows([GOOD_ROW, GOOD_ROW, {**GOOD_ROW, "output": "  "}]))


@case("field-not-text")
def _(ws: Workspace) -> Outcome:
    return ws.train_on(ws.rows([GOOD_ROW, GOOD_ROW, {**GOOD_ROW, "answer": ["4"]}]))


@case("column-of-mixed-types")
def _(ws: Workspace) -> Outcome:
    return ws.train_on(ws.rows([GOOD_ROW, GOOD_ROW, {**GOOD_ROW, "answer": 4}]))


@case("dataset-files-with-different-columns")
def _(ws: Workspace) -> Outcome:
    directory = ws.path / "data"
    directory.mkdir()
    ws.rows([GOOD_ROW, GOOD_ROW], "data/a.jsonl")
    ws.rows([{"question": "What is 1 + 1?", "output": "1 + 1 = 2", "answer": "2"}], "data/b.jsonl")
    return ws.train_on(directory)


@case("malformed-conversation")
def _(ws: Workspace) -> Outcome:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    return ws.train("dataset=local", f"dataset.path={ws.rows([{'messages': chat}, {'messages': bad}])}")


@case("nothing-left-after-length-filter")
def _(ws: Workspace) -> Outcome:
    rows = [{"input": f"What is {i} plus {i}?", "output": f"{i} + {i} = {2 * i}", "answer": str(2 * i)} for i in range(40)]
    return ws.train_on(ws.rows(rows), "train.max_length=16")


# --- adapters -----------------------------------------------------------------------------------


@case("adapters-missing")
def _(ws: Workspace) -> Outcome:
    return ws.merge(str(ws.path / "checkpoint-100"))


@case("adapters-full-checkpoint")
def _(ws: Workspace) -> Outcome:
    return ws.merge(str(ws.tiny_model))


@case("adapters-without-adapter-files")
def _(ws: Workspace) -> Outcome:
    (ws.path / "checkpoint-5").mkdir()
    return ws.merge(str(ws.path / "checkpoint-5"))


@case("adapters-without-weights")
def _(ws: Workspace) -> Outcome:
    checkpoint = ws.path / "checkpoint-5"
    checkpoint.mkdir()
    shutil.copy(ws.adapters["tiny"] / "adapter_config.json", checkpoint)
    return ws.merge(str(checkpoint))


@case("adapters-unreadable-config")
def _(ws: Workspace) -> Outcome:
    checkpoint = ws.path / "checkpoint-5"
    shutil.copytree(ws.adapters["tiny"], checkpoint)
    (checkpoint / "adapter_config.json").write_text('{"base_model_name_or_path": ')
    return ws.merge(str(checkpoint))


@case("adapters-run-directory")
def _(ws: Workspace) -> Outcome:
    run = ws.path / "lora-run"
    for step in (5, 10):
        shutil.copytree(ws.adapters["tiny"], run / f"checkpoint-{step}")
        # The file the Trainer writes last, which marks a checkpoint complete (npu_recipes.run.checkpoints).
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ws.merge(str(run))


@case("adapter-base-mismatch")
def _(ws: Workspace) -> Outcome:
    # A checkpoint of a LoRA trained on the wider model, inside a run directory whose resolved.yaml
    # names the tiny model (a checkpoint copied into the wrong run).
    from npu_recipes.config import compose, resolved

    run = ws.path / "run-on-tiny"
    shutil.copytree(ws.adapters["wide"], run / "checkpoint-1")
    (run / "resolved.yaml").write_text(resolved.to_yaml(compose.compose(["device=cpu"])))
    return ws.merge(str(run / "checkpoint-1"))


@case("adapter-base-changed")
def _(ws: Workspace) -> Outcome:
    # The wide model's adapter, naming as its base a directory that now holds another model (the
    # tiny one), as when a base model's directory is overwritten after training.
    base = ws.path / "base"
    shutil.copytree(ws.tiny_model, base)
    adapter = ws.path / "adapter"
    shutil.copytree(ws.adapters["wide"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return ws.merge(str(adapter))


@case("adapters-of-different-bases")
def _(ws: Workspace) -> Outcome:
    return ws.merge(f"[{ws.adapters['tiny']},{ws.adapters['wide']}]")


@case("adapters-best-without-evaluation")
def _(ws: Workspace) -> Outcome:
    from npu_recipes.config import compose, resolved

    run = ws.path / "lora-run"
    shutil.copytree(ws.adapters["tiny"], run / "checkpoint-1")
    (run / "checkpoint-1" / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    (run / "resolved.yaml").write_text(resolved.to_yaml(compose.compose(["device=cpu"])))
    (run / "manifest.json").write_text(json.dumps({"status": "completed"}))
    return ws.merge(str(run / "best"))


# --- output directories -------------------------------------------------------------------------


@case("output-dir-unwritable")
def _(ws: Workspace) -> Outcome:
    run = unwritable_dir(ws) / "npu-recipes-run"
    return Outcome(run_cli("device=cpu", f"output_dir={run}", *DEMO_MAPPING, f"dataset.path={ws.rows([GOOD_ROW])}"), [run])


@case("output-dir-not-empty")
def _(ws: Workspace) -> Outcome:
    (ws.path / "run").mkdir()
    (ws.path / "run" / "notes.txt").write_text("keep me")
    outcome = ws.train()
    assert (ws.path / "run" / "notes.txt").read_text() == "keep me"
    return Outcome(outcome.result)


@case("output-dir-is-a-file")
def _(ws: Workspace) -> Outcome:
    (ws.path / "run").write_text("a file")
    return Outcome(ws.train().result)


@case("output-dir-below-a-file")
def _(ws: Workspace) -> Outcome:
    (ws.path / "runs").write_text("a file where a directory was meant")
    return Outcome(run_cli("device=cpu", f"output_dir={ws.path / 'runs' / 'run'}"))


@case("output-dir-taken-at-the-same-moment")
def _(ws: Workspace) -> Outcome:
    from npu_recipes.run import lock

    # The moment after another run created the directory and took its lock, before it wrote
    # anything else: this test's own process stands for that run.
    (ws.path / "run").mkdir()
    lock.claim(ws.path / "run")
    try:
        return Outcome(ws.train().result)
    finally:
        lock.release(ws.path / "run")


@case("merge-target-unwritable")
def _(ws: Workspace) -> Outcome:
    target = unwritable_dir(ws) / "npu-recipes-merged"
    result = run_cli("device=cpu", "stage=merge", f"adapters={ws.adapters['tiny']}", f"merge.output_dir={target}")
    return Outcome(result, [target])


@case("infer-results-unwritable")
def _(ws: Workspace) -> Outcome:
    results = unwritable_dir(ws) / "npu-recipes-results"
    result = run_cli("device=cpu", "stage=infer", f"adapters={ws.adapters['tiny']}", *DEMO_MAPPING,
                     f"dataset.path={ws.rows([GOOD_ROW])}", f"infer.result_dir={results}")
    return Outcome(result, [results, ws.adapters["tiny"] / "infer_result"])


# --- resuming, disks and devices ------------------------------------------------------------------

RESUMABLE = ("device=cpu", "train.max_steps=1", "train.save_steps=1", "train.learning_rate=1e-4")


def finished_run(ws: Workspace) -> Path:
    """A copy of a one-step training run (made once per module in this process: it is the setting,
    not the case) whose directory the case then reuses through the CLI (it must survive the case)."""
    template = ws.shared / "finished-run"
    if not template.is_dir():
        run_in_process(*RESUMABLE, f"output_dir={template}")
    run = ws.path / "run"
    shutil.copytree(template, run)
    return run


@case("resume-changed-settings")
def _(ws: Workspace) -> Outcome:
    run = finished_run(ws)
    return Outcome(run_cli(*RESUMABLE, "train.learning_rate=2e-4", f"output_dir={run}"))


@case("resume-other-world-size")
def _(ws: Workspace) -> Outcome:
    run = finished_run(ws)
    return Outcome(run_cli(*RESUMABLE, "parallelism=ddp", "parallelism.nproc_per_node=2", f"output_dir={run}"))


@case("resume-not-a-checkpoint")
def _(ws: Workspace) -> Outcome:
    (ws.path / "checkpoint-7").mkdir()
    return ws.train(f"resume={ws.path / 'checkpoint-7'}")


@case("resume-without-optimizer-state")
def _(ws: Workspace) -> Outcome:
    run = finished_run(ws)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (run / "checkpoint-1" / name).unlink()
    return Outcome(run_cli("device=cpu", "train.max_steps=2", "train.save_steps=1", "train.learning_rate=1e-4", f"output_dir={run}"))


@case("output-dir-in-use")
def _(ws: Workspace) -> Outcome:
    import platform

    run = finished_run(ws)
    from npu_recipes.run import lock

    manifest = json.loads((run / "manifest.json").read_text())
    # This test's own process stands for a training process still writing the directory: it is
    # the manifest's process and holds the run's lock.
    manifest.update(status="running", pid=os.getpid(), host=platform.node())
    (run / "manifest.json").write_text(json.dumps(manifest))
    lock.claim(run)
    try:
        return Outcome(run_cli(*RESUMABLE, f"output_dir={run}"))
    finally:
        lock.release(run)


@case("disk-full-while-saving")
def _(ws: Workspace) -> Outcome:
    return Outcome(run_faulty_cli("no-space-at-checkpoint=2", "device=cpu", "train.max_steps=3", "train.save_steps=1",
                              f"output_dir={ws.path / 'run'}"))


@case("stop-in-a-long-step", exit_status=143)
def _(ws: Workspace) -> Outcome:
    # The third step sends SIGTERM and then takes ten minutes: the run must stop after the one-second bound.
    return Outcome(run_faulty_cli("sigterm-in-slow-step=3", "device=cpu", "dataset.max_samples=40", "train.max_steps=4",
                                  "train.save_steps=1", "train.gradient_accumulation_steps=1", "parallelism.stop_timeout=1",
                                  f"output_dir={ws.path / 'run'}", timeout=120))


@case("max-length-over-context")
def _(ws: Workspace) -> Outcome:
    return ws.train("train.max_length=100000000")


@case("device-out-of-memory")
def _(ws: Workspace) -> Outcome:
    run = ws.path / "run"
    return Outcome(run_faulty_cli("out-of-memory-at-step=2", "device=cpu", "train.max_steps=3", f"output_dir={run}"), [run])


# --- config -------------------------------------------------------------------------------------


@case("unknown-key")
def _(ws: Workspace) -> Outcome:
    return ws.train("train.learnin_rate=1e-4")


@case("unknown-option")
def _(ws: Workspace) -> Outcome:
    return ws.train("dataset=blossom")


@case("value-out-of-range")
def _(ws: Workspace) -> Outcome:
    return ws.train("train.learning_rate=-1e-4")


@case("value-not-finite")
def _(ws: Workspace) -> Outcome:
    return ws.train("train.learning_rate=inf")


@case("val-split-ratio-too-large")
def _(ws: Workspace) -> Outcome:
    return ws.train("dataset.val_split_ratio=0.99")


@case("load-best-model-without-evaluation")
def _(ws: Workspace) -> Outcome:
    return ws.train("train.load_best_model_at_end=true", "dataset.val_split_ratio=0")


@case("value-of-wrong-type")
def _(ws: Workspace) -> Outcome:
    return ws.train("train.max_length=long")


@case("swift-flag-on-overrides")
def _(ws: Workspace) -> Outcome:
    return Outcome(run_cli("--model", "Qwen/Qwen2-7B-Instruct", cwd=ws.path), [ws.path / "outputs"])


@case("unknown-swift-flag")
def _(ws: Workspace) -> Outcome:
    return Outcome(run_cli("sft", "--model", "Qwen/Qwen2-7B-Instruct", "--learning_rat", "1e-4", cwd=ws.path), [ws.path / "outputs"])


@case("recipe-file-not-yaml")
def _(ws: Workspace) -> Outcome:
    recipe = ws.path / "mine.yaml"
    recipe.write_text("train:\n  learning_rate: [1e-4\n")
    return Outcome(run_cli(f"+recipe={recipe}", cwd=ws.path), [ws.path / "outputs"])


@case("recipe-file-without-plus")
def _(ws: Workspace) -> Outcome:
    (ws.path / "mine.yaml").write_text("train:\n  max_steps: 1\n")
    return Outcome(run_cli("train", "mine.yaml", cwd=ws.path), [ws.path / "outputs"])


@case("several-values-without-multirun")
def _(ws: Workspace) -> Outcome:
    return ws.train("train.learning_rate=1e-4,2e-4")


# --- recipe files ---------------------------------------------------------------------------------


def broken_recipe(ws: Workspace, text: str) -> Outcome:
    """The broken recipe selected; first, with it in place, commands that do not use it still work."""
    for other in (("+recipe=demo", "--cfg", "job"), ("stage=doctor", "--cfg", "job")):
        unaffected = ws.with_recipe(text, *other)
        assert unaffected.returncode == 0, unaffected.stderr[-3000:]
    return Outcome(ws.with_recipe(text))


@case("recipe-not-yaml")
def _(ws: Workspace) -> Outcome:
    return broken_recipe(ws, "# @package _global_\ntrain:\n  learning_rate: [1\n")


@case("recipe-not-a-mapping")
def _(ws: Workspace) -> Outcome:
    return Outcome(ws.with_recipe("- train.learning_rate: 1\n- train.max_steps: 2\n"))


@case("recipe-unknown-key")
def _(ws: Workspace) -> Outcome:
    return Outcome(ws.with_recipe("# @package _global_\ntrain:\n  learnin_rate: 1.0e-4\n"))


@case("recipe-unknown-option")
def _(ws: Workspace) -> Outcome:
    return Outcome(ws.with_recipe("# @package _global_\ndefaults:\n  - override /model: tiny_qwen\n"))


@case("recipe-value-of-wrong-type")
def _(ws: Workspace) -> Outcome:
    return Outcome(ws.with_recipe("# @package _global_\ntrain:\n  max_length: long\n"))


@case("recipe-dotted-key")
def _(ws: Workspace) -> Outcome:
    """A recipe file of the user's own (+recipe=FILE) is checked as the shipped ones are."""
    (ws.path / "mine.yaml").write_text("train.learning_rate: 1.0e-4\n")
    return Outcome(run_cli("+recipe=./mine.yaml", cwd=ws.path), [ws.path / "outputs"])


# --- doctor findings ------------------------------------------------------------------------------

DOCTOR_CARDS = {0: 65500, 1: 20000}
"""Memory in use (MB) the fake npu-smi reports for cards 0 and 1 of the 8 x 910B3 fixture."""


def doctor_findings(ws: Workspace) -> Outcome:
    """``stage=doctor`` for a run of the tiny model on 4 cards of the fixture machine, with a fake
    npu-smi; run once for every doctor row of the module (the rows are findings of one report)."""
    done = ws.shared / "doctor.json"
    if not done.is_file():
        info = (NPU_SMI_FIXTURES / "info_8x910B3.txt").read_text()
        for card, used in DOCTOR_CARDS.items():
            info = info.replace(f"| 0000:{['C1', 'C2'][card]}:00.0  | 0           0    / 0          {3318 if card == 0 else 3314} / 65536",
                                f"| 0000:{['C1', 'C2'][card]}:00.0  | 0           0    / 0          {used} / 65536")
        assert all(f"{used} / 65536" in info for used in DOCTOR_CARDS.values())
        bin_dir = ws.shared / "bin"
        bin_dir.mkdir()
        (bin_dir / "info.txt").write_text(info)
        tool = bin_dir / "npu-smi"
        tool.write_text(f'#!/bin/sh\nif [ "$*" = "info -t topo" ]; then cat "{NPU_SMI_FIXTURES / "topo_8x910B3_hccs.txt"}"; '
                        f'else cat "{bin_dir / "info.txt"}"; fi\n')
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        result = run_cli("stage=doctor", "parallelism.nproc_per_node=4", cwd=ws.path, env=env)
        done.write_text(json.dumps({"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}))
    saved = json.loads(done.read_text())
    return Outcome(subprocess.CompletedProcess([], saved["returncode"], saved["stdout"], saved["stderr"]))


@case("doctor-memory-in-use", exit_status=1, doctor_check="memory in use")
def _(ws: Workspace) -> Outcome:
    return doctor_findings(ws)


@case("doctor-planned-peak-does-not-fit", exit_status=1, doctor_check="planned peak")
def _(ws: Workspace) -> Outcome:
    return doctor_findings(ws)


@case("doctor-mixed-numa-affinity", exit_status=1, doctor_check="CPU affinity")
def _(ws: Workspace) -> Outcome:
    return doctor_findings(ws)


# --- several processes and nodes ---------------------------------------------------------------

MULTI_NODE = ("parallelism=ddp", "parallelism.nproc_per_node=1", "parallelism.nnodes=2", "parallelism.master_port=29400")


@case("global-batch-not-divisible")
def _(ws: Workspace) -> Outcome:
    return ws.train("parallelism=ddp", "parallelism.nproc_per_node=8", "parallelism.nnodes=2", "parallelism.master_addr=10.0.0.1",
                    "parallelism.master_port=29400", "train.global_batch_size=100")


@case("loopback-master-for-several-nodes")
def _(ws: Workspace) -> Outcome:
    return ws.train(*MULTI_NODE, "parallelism.master_addr=127.0.0.2")


@case("node-zero-never-created-the-run")
def _(ws: Workspace) -> Outcome:
    return ws.train(*MULTI_NODE, "parallelism.master_addr=10.0.0.1", "parallelism.node_rank=1", "parallelism.join_timeout=1")


# --- the table ----------------------------------------------------------------------------------


@dataclass
class Row:
    case_id: str
    message: str
    fix: str


def _cell_text(cell: str) -> str:
    """A table cell's text without its code-span backticks (CommonMark: a run of n backticks opens and
    closes the span; one space inside each end is dropped, so ``` `` a `b` `` ``` holds a `b`)."""
    cell = cell.strip()
    fence = re.match(r"`+", cell)
    if not fence or not cell.endswith(fence.group()) or len(cell) < 2 * len(fence.group()):
        return cell
    inner = cell[len(fence.group()):-len(fence.group())]
    return inner[1:-1] if inner.startswith(" ") and inner.endswith(" ") and inner.strip() else inner


def table_rows() -> List[Row]:
    """The rows of docs/troubleshooting.md's tables whose first cell is a case id in backticks."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [cell for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 3 and re.fullmatch(r"`[a-z0-9-]+`", cells[0].strip()):
            message, fix = (_cell_text(cell).replace("\\|", "|") for cell in cells[1:])
            rows.append(Row(cells[0].strip().strip("`"), message, fix))
    return rows


def pattern(documented: str) -> re.Pattern:
    """The documented text as a regular expression: ``<...>`` placeholders match any text on one line."""
    parts = re.split(r"<[^<>]+>", documented)
    return re.compile("[^\n]+?".join(re.escape(part) for part in parts))


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory) -> Dict[str, Path]:
    """PEFT LoRA adapters made in this process (``save_pretrained``, as training saves them): one on
    the tiny model, one on a wider variant of it (hidden size 32 instead of 64), saved beside its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    wide = AutoConfig.from_pretrained(tiny_model_path)
    wide.hidden_size, wide.intermediate_size = 32, 88
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(wide).save_pretrained(root / "wide-base")
    made = {}
    for name, base in (("tiny", tiny_model_path), ("wide", root / "wide-base")):
        model = AutoModelForCausalLM.from_pretrained(base)
        get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(root / name)
        made[name] = root / name
    return made


def test_every_documented_case_has_a_case_function_and_every_case_a_row():
    documented = [row.case_id for row in table_rows()]
    assert len(documented) == len(set(documented)), "a case id appears twice in docs/troubleshooting.md"
    assert set(documented) == set(CASES), (
        f"documented without a case function: {sorted(set(documented) - set(CASES))}; "
        f"case functions without a row: {sorted(set(CASES) - set(documented))}"
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared")


def _doctor_finding(check: str, result: subprocess.CompletedProcess) -> tuple:
    """The doctor table's detail and fix for ``check`` (its row ``check  WARN|FAIL  detail``, and ``STATUS check: fix``)."""
    row = next(line for line in result.stdout.splitlines() if re.match(rf"{re.escape(check)}\s+(WARN|FAIL)\s", line))
    fix = next(line for line in result.stdout.splitlines() if re.match(rf"  (WARN|FAIL) {re.escape(check)}: ", line))
    return re.split(r"\s+(?:WARN|FAIL)\s+", row, maxsplit=1)[1], fix.split(": ", 1)[1]


@pytest.mark.cli
@pytest.mark.parametrize("row", table_rows(), ids=lambda row: row.case_id)
def test_documented_message_and_fix_are_what_the_user_sees(row, tmp_path, tiny_model_path, adapters, shared):
    documented = CASES[row.case_id]
    outcome = documented.run(Workspace(tmp_path, tiny_model_path, adapters, shared))
    if documented.doctor_check:
        assert outcome.result.returncode == documented.exit_status and "Traceback" not in outcome.result.stderr, outcome.result.stderr[-3000:]
        detail, fix = _doctor_finding(documented.doctor_check, outcome.result)
        assert pattern(row.message).fullmatch(detail), f"documented: {row.message}\nprinted:    {detail}"
        assert pattern(row.fix).fullmatch(fix), f"documented fix: {row.fix}\nprinted fix:    {fix}"
        return
    stderr = outcome.result.stderr
    assert outcome.result.returncode == CASES[row.case_id].exit_status, stderr[-3000:]
    assert stderr.count("npu_recipes: error:") == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    block = stderr[stderr.index("npu_recipes: error:"):]
    message, _, rest = block.partition("\n")
    assert pattern(row.message).search(message), f"documented: {row.message}\nprinted:    {message}"
    fix = next((line.strip()[len("fix: "):] for line in rest.splitlines() if line.strip().startswith("fix: ")), "")
    assert pattern(row.fix).search(fix), f"documented fix: {row.fix}\nprinted fix:    {fix}"
    for path in outcome.absent:
        assert not path.exists(), f"{row.case_id} left {path} behind"
