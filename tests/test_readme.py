"""README.md's command lines work as printed: every `npu-recipes` / `python -m npu_recipes` line is extracted,
its placeholders filled, and composed and validated in this process; the inference block runs for real
on a CPU-sized LoRA run made by the README's own LoRA line (2 steps on 100 demo rows)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from npu_recipes import commands
from npu_recipes.config import compose, swift
from npu_recipes.errors import UserError
from tests.helpers import GSM8K, REPO, read_jsonl, run_in_process

COMMAND = re.compile(r"^(?:\$ )?((?:[A-Z_]+=\S+ )*)(?:npu-recipes|python -m npu_recipes)(?:\s|$)(.*)$")
CPU_SIZED = ["train.max_steps=2", "dataset.max_samples=100"]
"""What the README's LoRA line gets here to stay CPU-sized (it trains 50 steps on 3,000 rows)."""


def readme_commands() -> list[tuple[str, dict, list[str]]]:
    """(line, environment, arguments) of every command line in README.md's code blocks; template
    lines (`[...]`, `NAME`) are left out."""
    text = (REPO / "README.md").read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.splitlines()]
    lines += [line[4:] for line in text.splitlines() if line.startswith("    ")]
    found = []
    for line in lines:
        match = COMMAND.match(line.strip())
        if not match or "[" in line or "NAME" in line:
            continue
        environment = dict(word.split("=", 1) for word in match.group(1).split())
        found.append((line.strip(), environment, shlex.split(match.group(2), comments=True)))
    return found


def _filled(arguments: list[str], places: dict) -> list[str]:
    text = shlex.join(arguments)
    for placeholder, value in places.items():
        text = text.replace(placeholder, value)
    return shlex.split(text)


def _compose(arguments: list[str], environment: dict, monkeypatch) -> None:
    """What the CLI does before running anything, for one README line."""
    for variable in ("NPROC_PER_NODE", "ASCEND_RT_VISIBLE_DEVICES"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    if arguments[:1] in (["--help"], ["ls"]):
        assert commands.help_text() if arguments == ["--help"] else commands.dispatch(arguments) is None
        return
    if arguments and arguments[0] in ("show", "cp"):
        commands.dispatch(arguments)
        return
    if arguments and arguments[0] in swift.COMMANDS:
        compose.compose(swift.translate(arguments[0], arguments[1:], environment).overrides)
        return
    overrides = [a for a in arguments if not a.startswith("-") and a != "job"]
    if "-m" in arguments:
        overrides = [o.split(",")[0] for o in overrides]
    compose.compose(overrides)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The README's LoRA line, CPU-sized: the run its inference block reads as RUN."""
    (line,) = [args for _, _, args in readme_commands() if "train_type=lora" in args and "+recipe=demo" in args]
    run = tmp_path_factory.mktemp("readme") / "run"
    run_in_process(*line, *CPU_SIZED, f"output_dir={run}")
    return run


@pytest.mark.slow
def test_every_readme_command_line_composes_and_its_inference_block_runs(lora_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_chats.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n')
    places = {"RUN": str(lora_run), "checkpoint-N": "checkpoint-2", "../shared/data/gsm8k": str(GSM8K)}
    lines = readme_commands()
    assert len(lines) >= 25, "the README's commands were not found"
    ran = []
    for line, environment, arguments in lines:
        arguments = _filled(arguments, places)
        if "train.learnin_rate=1e-4" in arguments:
            with pytest.raises(UserError, match=r"unknown config key 'train.learnin_rate' \(did you mean 'train.learning_rate'\?\)"):
                _compose(arguments, environment, monkeypatch)
            continue
        try:
            _compose(arguments, environment, monkeypatch)
        except UserError as error:
            pytest.fail(f"README line fails: {line}\n{error}")
        if str(lora_run) in " ".join(arguments) and arguments[0] not in swift.COMMANDS:
            run_in_process(*arguments, "device=cpu", "infer.max_new_tokens=4")
            ran.append(arguments[0])
    capsys.readouterr()
    assert ran == ["stage=infer", "stage=merge", "stage=infer"]
    merged = Path(f"{lora_run}/checkpoint-2-merged")
    assert (merged / "manifest.json").is_file()
    for results in (lora_run / "checkpoint-2" / "infer_result", merged / "infer_result"):
        (rows,) = results.glob("*.jsonl")
        assert len(read_jsonl(rows)) == 1, "the run held out 1 of its 100 rows (0.01, at least one)"
