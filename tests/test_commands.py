"""The CLI's own subcommands: `--help`, `ls`, `show`, `cp` and `+recipe=FILE`, and what they leave unimported."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from npu_recipes import commands
from npu_recipes.config import compose, schema, swift
from npu_recipes.errors import UserError
from tests.helpers import REPO


def test_help_lists_every_stage_with_what_it_does_and_every_group():
    text = commands.help_text()
    assert set(commands.STAGE_HELP) == set(schema.STAGES)
    for stage, what in commands.STAGE_HELP.items():
        assert f"  {stage:<8} {what}" in text
    for group, options in compose.group_options().items():
        assert ", ".join(options) in text, group
    assert "npu-recipes sft|infer|export|deploy" in text and "npu-recipes ls" in text


def test_ls_lists_every_recipe_from_the_stored_rows_with_its_description(capsys):
    commands.dispatch(["ls"])
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in compose.recipe_names()]
    assert sorted(listed) == compose.recipe_names()
    for name in ("qwen7b_lora_zero3", "demo"):
        config = compose.compose([f"+recipe={name}"])
        line = next(line for line in out.splitlines() if line.split() and line.split()[0] == name)
        assert f"{line}\n    {config.description}\n" in out
        assert str(config.parallelism.world_size) in line.split() and config.parallelism.name in line.split()
    assert "Ascend 910B3" in out and "CPU (host RAM)" in out


def test_show_prints_the_composed_config_with_overrides(capsys):
    commands.dispatch(["show", "qwen7b_lora_zero3", "train.learning_rate=3e-4"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["recipe"] == "qwen7b_lora_zero3" and shown["train"]["learning_rate"] == 3e-4
    assert shown["parallelism"]["zero_stage"] == 3 and shown["reference"]["seed_row"] == 4


def test_a_copied_recipe_runs_with_plus_recipe_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands.dispatch(["cp", "qwen7b_lora_zero2", "mine"])
    assert "+recipe=mine.yaml" in capsys.readouterr().out
    (tmp_path / "mine.yaml").write_text((tmp_path / "mine.yaml").read_text() + "train:\n  max_length: 1024\n")
    copied = compose.compose(["+recipe=mine.yaml"])
    shipped = compose.compose(["+recipe=qwen7b_lora_zero2"])
    assert copied.recipe == "mine" and copied.output_dir.startswith("outputs/mine/")
    assert (copied.train.max_length, copied.parallelism, copied.model) == (1024, shipped.parallelism, shipped.model)
    assert compose.compose([f"+recipe={tmp_path / 'mine.yaml'}", "train.max_length=512"]).train.max_length == 512
    with pytest.raises(UserError, match="exists already"):
        commands.dispatch(["cp", "demo", "mine.yaml"])
    (tmp_path / "into").mkdir()
    commands.dispatch(["cp", "demo", "into"])
    assert (tmp_path / "into" / "demo.yaml").is_file(), "a directory as target receives NAME.yaml"


@pytest.mark.parametrize("argv,message", [
    (["show", "qwen7b_lora_singel"], "no recipe 'qwen7b_lora_singel' (did you mean 'qwen7b_lora_single'?)"),
    (["cp", "demo"], "needs a recipe and a file"),
    (["ls", "extra"], "takes no arguments"),
    (["show", "./missing.yaml"], "recipe file ./missing.yaml does not exist"),
    (["cp", "base/train", "x.yaml"], "npu-recipes cp: no recipe 'base/train'"),
    (["cp", "/etc/hostname", "x.yaml"], "npu-recipes cp: no recipe '/etc/hostname'"),
])
def test_subcommand_mistakes_are_one_clear_error(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        commands.dispatch(argv)
    assert message in str(caught.value)


@pytest.mark.parametrize("text,message,fix", [
    ("train:\n  learning_rate: [1\n", "line 2: not valid YAML (expected ',' or ']'", "fix that line of"),
    ("foo: &a [*a]\n", "holds a YAML alias (*name) that refers to the value containing it", "remove that alias"),
    ("# @package _global_\ndefaults:\n  - base/seed_sft\ntrain:\n  learnin_rate: 2e-4\n",
     "line 5: unknown config key 'train.learnin_rate' (did you mean 'train.learning_rate'?)", "correct that key in"),
    ("train.learnin_rate: 1\n", "line 1: unknown config key 'train.learnin_rate' (did you mean 'train.learning_rate'?)", "correct that key in"),
    ("train.learning_rate: 1\n", "line 1: 'train.learning_rate' is a dotted key", "nest it in"),
    ("defaults:\n  - override /model: tiny_qwen\n", "line 2: unknown option for model 'tiny_qwen' (did you mean 'tiny_qwen2'?)",
     "correct that entry of the defaults list in"),
    ("defaults:\n  - base/seed_sfd\n", "line 2: the defaults list includes 'base/seed_sfd', which is not a recipe", "correct that entry"),
    ("train:\n  max_length: long\n", "line 2: train.max_length='long': Value 'long' of type 'str' could not be converted", "correct the value"),
])
def test_a_recipe_file_of_your_own_is_checked_as_a_shipped_recipe_is(text, message, fix, tmp_path, monkeypatch):
    """+recipe=FILE runs load_recipe's checks: Hydra's raw ConfigKeyError named an internal recipe name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text(text)
    with pytest.raises(UserError) as caught:
        compose.compose(["+recipe=./my.yaml", "stage=plan"])
    assert caught.value.message.startswith(f"my.yaml {message}") and caught.value.fix.startswith(f"{fix} ")
    assert "my.yaml" in caught.value.fix


@pytest.mark.parametrize("argv,meant", [
    (["--model", "Qwen/Qwen2-7B-Instruct"], "write model.name_or_path=Qwen/Qwen2-7B-Instruct, or use the swift-style command"),
    (["+recipe=demo", "--learning_rate=2e-4"], "write train.learning_rate=2e-4"),
    (["--bogus"], "unknown option --bogus"),
])
def test_swift_flags_on_the_hydra_entry_point_name_the_override(argv, meant):
    with pytest.raises(UserError) as caught:
        commands.check_hydra_arguments(argv)
    assert meant in str(caught.value)


@pytest.mark.parametrize("argv,problem,meant", [
    (["my_recipe.yaml"], "'my_recipe.yaml' is a recipe file, which is selected with +recipe=FILE", "npu-recipes +recipe=my_recipe.yaml"),
    (["train", "./my.yml", "train.max_steps=3"], "'train' is not a subcommand", "npu-recipes +recipe=./my.yml train.max_steps=3"),
    (["plan", "+recipe=demo"], "'plan' is a stage, which is chosen with stage=plan", "npu-recipes stage=plan +recipe=demo"),
    (["help"], "'help' is not a subcommand", "npu-recipes --help"),
])
def test_other_tools_command_forms_say_what_to_type(argv, problem, meant):
    """LLaMA-Factory's `train FILE`, a bare recipe file, `help` or a stage name as a word: Hydra's
    "missing EQUAL" said nothing useful about them."""
    with pytest.raises(UserError) as caught:
        commands.check_hydra_arguments(argv)
    assert problem in caught.value.message and caught.value.fix == f"write {meant}"
    commands.check_hydra_arguments(["--cfg", "job", "-cn", "config.yaml", "+recipe=demo"])


def test_swift_subcommand_help_lists_that_subcommands_flags(capsys):
    assert commands.dispatch(["sft", "--help"]) is None
    shown = capsys.readouterr().out
    flags = {line.split()[0] for line in shown.splitlines() if line.startswith("  --")}
    assert flags == {f"--{name}" for name, flag in swift.FLAGS.items() if "sft" in flag.commands}
    assert "  --learning_rate V" in shown and "train.learning_rate=VALUE" in shown and "--api_key" not in shown
    assert commands.dispatch(["deploy", "--port", "8000", "-h"]) is None
    assert "  --api_key V" in capsys.readouterr().out


def test_secrets_are_masked_in_printed_and_recorded_command_lines(capsys, monkeypatch):
    overrides = commands.dispatch(["deploy", "--api_key", "sekrit", "--port", "8001"])
    assert "serve.api_key=sekrit" in overrides, "the run itself gets the key"
    printed = capsys.readouterr().err
    assert "serve.api_key=***" in printed and "serve.port=8001" in printed and "sekrit" not in printed
    monkeypatch.setattr(sys, "argv", ["npu-recipes", "deploy", "--api-key=sekrit", "--api_key", "sekrit", "+serve.api_key=sekrit"])
    from npu_recipes.run import manifest

    assert manifest.command_line().endswith("-m npu_recipes deploy '--api-key=***' --api_key '***' '+serve.api_key=***'")


@pytest.mark.cli
def test_a_reader_that_closes_stdout_early_ends_the_command_quietly():
    """`npu-recipes ls | head -1`: the pipe closes before ls writes; no BrokenPipeError traceback, and
    the exit status of a program SIGPIPE ended (141)."""
    process = subprocess.Popen([sys.executable, "-m", "npu_recipes", "ls"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and stderr == ""


@pytest.mark.cli
def test_help_ls_show_and_a_config_error_import_no_torch_transformers_or_datasets(tmp_path):
    """What answers in about a second must not pay for the heavy imports: the four commands run in one
    process here, which then lists which of the heavy modules got imported (none)."""
    script = (
        "import sys, contextlib, io\n"
        "from npu_recipes import cli\n"
        "for argv in (['--help'], ['sft', '--help'], ['ls'], ['show', 'qwen7b_lora_zero3'], ['train.learnin_rate=1'],\n"
        "             ['sft', '--lerning_rate', '1']):\n"
        "    sys.argv = ['npu-recipes', *argv]\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            cli.main()\n"
        "        except SystemExit as exit:\n"
        "            assert exit.code == 2, (argv, exit.code)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft', 'deepspeed') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_tiny_model_on_your_data_says_so_and_a_name_or_path_override_picks_a_real_model(caplog):
    from npu_recipes.model import pretrained

    default = compose.compose([]).model
    pretrained.note_tiny_model(default, "demo_math")
    assert "random-init demo model" not in caplog.text
    pretrained.note_tiny_model(default, None)
    assert "random-init demo model" in caplog.text and "model.name_or_path=HUB_ID_OR_DIR" in caplog.text
    chosen = compose.compose(["model.name_or_path=Qwen/Qwen2-7B-Instruct"]).model
    assert not pretrained.is_built(chosen) and pretrained.resolve_path(chosen) == "Qwen/Qwen2-7B-Instruct"


def test_huggingface_hub_warnings_print_once(monkeypatch):
    """huggingface_hub gives its loggers a stream handler of their own; passed on to the root logger's
    handlers too, each offline retry warning printed twice. A record from one of its loggers reaches
    exactly one handler, found the way logging.Logger.callHandlers walks the hierarchy."""
    import logging

    from huggingface_hub.utils import logging as hf_logging

    from npu_recipes import cli

    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "propagate", True)
    logger = hf_logging.get_logger("huggingface_hub.file_download")
    cli.setup_logging()
    reached, node = [], logger
    while node is not None:
        reached += node.handlers
        node = node.parent if node.propagate else None
    assert len(reached) == 1 and isinstance(reached[0], logging.StreamHandler)
