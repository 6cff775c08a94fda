"""The CLI's subcommands besides composing and running: help, recipe discovery and ms-swift's commands.

``npu-recipes ls`` lists the recipes, ``show NAME`` prints one composed, ``cp NAME FILE`` copies one
to edit (then ``+recipe=FILE``), and ``sft|infer|export|deploy --flag value ...`` are swift's
commands, translated by :mod:`npu_recipes.config.swift` into the overrides of the equivalent
``python -m npu_recipes ...`` line, which :mod:`npu_recipes.cli` prints and runs. Nothing here imports
torch, transformers or datasets: each of these answers in well under two seconds.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

from npu_recipes import atomic, paths
from npu_recipes.config import compose, swift
from npu_recipes.config.schema import STAGES, did_you_mean
from npu_recipes.errors import UserError

DISCOVERY = ("ls", "show", "cp")
_RECIPE_SUFFIXES = (".yaml", ".yml")
SUBCOMMANDS = DISCOVERY + tuple(swift.COMMANDS)
"""First arguments that select a subcommand instead of Hydra overrides."""

STAGE_HELP = {
    "train": "supervised fine-tuning, LoRA or full (transformers Trainer + PEFT); writes a run directory",
    "merge": "fold LoRA adapters into their base model: stage=merge adapters=RUN/checkpoint-N",
    "infer": "terminal chat, or batch generation and accuracy on a dataset (load_data_args=true: the run's validation split)",
    "serve": "OpenAI-compatible HTTP server for a model and its adapters (/v1/chat/completions, ...)",
    "plan": "settings, launch command and per-device memory estimate from config.json alone; runs nothing",
    "doctor": "is this machine ready? torch/torch_npu, CANN, devices, HCCL, npu-smi; exit 1 names each failure",
}
"""One line per stage for ``--help`` (tests/test_commands.py holds its keys to :data:`npu_recipes.config.schema.STAGES`)."""


def help_text() -> str:
    """The short ``--help``: the command forms, the stages and what each does, the config groups."""
    groups = compose.group_options()
    lines = [
        "usage: npu-recipes [+recipe=NAME] [group=option ...] [key=value ...]   compose a config and run its stage",
        "       npu-recipes sft|infer|export|deploy --flag value ...           ms-swift's commands (docs/swift.md)",
        "       npu-recipes ls | show NAME [key=value ...] | cp NAME FILE       list, print or copy the recipes",
        "",
        "python -m npu_recipes takes the same arguments; with none it runs the demo (tiny model, generated",
        "arithmetic, under a minute on a CPU).",
        "",
        "stages (stage=NAME; train unless a recipe or option says otherwise):",
        *(f"  {name:<8} {STAGE_HELP[name]}" for name in STAGES),
        "",
        "config groups (group=option):",
        *(f"  {group:<12} {', '.join(options)}" for group, options in sorted(groups.items()) if group != compose.RECIPE_GROUP),
        f"  {'+recipe':<12} {', '.join(groups[compose.RECIPE_GROUP])} (npu-recipes ls), or +recipe=FILE.yaml",
        "",
        "examples:",
        "  npu-recipes +recipe=qwen7b_lora_single stage=plan             memory per device before renting any",
        "  npu-recipes +recipe=demo train_type=lora train.max_steps=50   any key: train.*, lora.*, model.*, dataset.*, ...",
        "  npu-recipes sft --model Qwen/Qwen2-7B-Instruct --dataset AI-ModelScope/blossom-math-v2 --train_type lora",
        "  npu-recipes stage=infer adapters=RUN/checkpoint-N load_data_args=true",
        "",
        "--cfg job prints the composed config without running; --hydra-help shows Hydra's own options.",
        "README.md and docs/ (recipes.md, swift.md, troubleshooting.md) say more.",
    ]
    return "\n".join(lines)


def dispatch(argv: List[str]) -> Optional[List[str]]:
    """Run subcommand ``argv[0]`` (one of :data:`SUBCOMMANDS`) with its arguments ``argv[1:]``.

    Returns:
        For swift's commands, the overrides of the equivalent ``python -m npu_recipes`` line (printed
        on stderr first), for the caller to run; None for ``ls``, ``show`` and ``cp``, which are done.

    Raises:
        UserError: wrong arguments for the subcommand, or anything the translation or composition refuses.
    """
    command, arguments = argv[0], argv[1:]
    if command in swift.COMMANDS and ("-h" in arguments or "--help" in arguments):
        print(swift.usage(command))
        return None
    if command in swift.COMMANDS:
        translation = swift.translate(command, arguments, os.environ)
        for note in translation.notes:
            print(f"npu_recipes: {note}", file=sys.stderr)
        line = shlex.join(["python", "-m", "npu_recipes", *swift.mask_secrets(translation.overrides)])
        print(f"npu_recipes: {command} runs as: {line}", file=sys.stderr, flush=True)
        return translation.overrides
    if arguments in (["-h"], ["--help"]):
        print("usage: " + "\n  ".join(_USAGE[command]))
        return None
    {"ls": _ls, "show": _show, "cp": _cp}[command](arguments)
    return None


_USAGE = {
    "ls": ("npu-recipes ls", "the recipes with their description, devices, parallelism, seed table row and planned memory"),
    "show": ("npu-recipes show NAME|FILE [key=value ...]", "the composed config of a recipe (with overrides), without running it"),
    "cp": ("npu-recipes cp NAME FILE", "copy a recipe to FILE to edit; run it with npu-recipes +recipe=FILE"),
}
"""Each discovery subcommand's usage line and what it does."""


def _usage_error(command: str, problem: str) -> UserError:
    return UserError(f"npu-recipes {command}: {problem}", fix=f"write {_USAGE[command][0]}")


def _ls(arguments: List[str]) -> None:
    from npu_recipes.plan import catalogue

    if arguments:
        raise _usage_error("ls", f"takes no arguments, got {' '.join(arguments)}")
    print(catalogue.render_text(catalogue.rows()))
    print("\nrun one: npu-recipes +recipe=NAME [key=value ...]; see its config: npu-recipes show NAME; "
          "plan it: npu-recipes +recipe=NAME stage=plan")


def _recipe_argument(command: str, name: str) -> str:
    """``+recipe=...`` for a recipe name or file; UserError naming the closest recipe when neither."""
    if compose.is_recipe_file(name) or name in compose.recipe_names():
        return f"+recipe={name}"
    names = compose.recipe_names()
    raise UserError(f"npu-recipes {command}: no recipe {name!r}{did_you_mean(name, names)}; recipes: {', '.join(names)}",
                    fix="npu-recipes ls lists them; a recipe file needs its path (./FILE.yaml)")


def _show(arguments: List[str]) -> None:
    from omegaconf import OmegaConf

    from npu_recipes.config.validate import validate

    if not arguments or arguments[0].startswith(("-", "+")) or "=" in arguments[0]:
        raise _usage_error("show", "needs a recipe name first")
    overrides = compose.recipe_file_overrides([_recipe_argument("show", arguments[0]), *arguments[1:]])
    compose.check_overrides(overrides)
    composed = compose.compose_dictconfig(overrides)
    validate(composed)
    print(OmegaConf.to_yaml(composed), end="")


def _cp(arguments: List[str]) -> None:
    if len(arguments) != 2:
        raise _usage_error("cp", f"needs a recipe and a file, got {len(arguments)} argument(s)")
    name, target = arguments
    source = paths.recipes_dir() / f"{name}.yaml"
    names = compose.recipe_names()
    if name not in names:
        raise UserError(f"npu-recipes cp: no recipe {name!r}{did_you_mean(name, names)}; recipes: {', '.join(names)}",
                        fix="npu-recipes ls lists them (cp copies a shipped recipe; a file of your own is copied with cp itself)")
    destination = Path(target).expanduser()
    if destination.is_dir():
        destination = destination / f"{name}.yaml"
    elif destination.suffix not in (".yaml", ".yml"):
        destination = destination.with_suffix(".yaml")
    if destination.exists():
        raise UserError(f"npu-recipes cp: {destination} exists already", fix="choose another file name, or delete that file first")
    text = source.read_text()
    note = (f"# Copied from recipe {name} by `npu-recipes cp`. Edit it, then run it with:\n"
            f"#   npu-recipes +recipe={destination}\n")
    try:
        atomic.write_text(destination, note + text)
    except OSError as error:
        raise UserError(f"npu-recipes cp: cannot write {destination}: {error.strerror}",
                        fix="choose a file in a writable directory") from None
    print(f"wrote {destination}; run it with: npu-recipes +recipe={destination}")


def check_hydra_arguments(argv: List[str]) -> None:
    """Refuse swift-style ``--flag`` arguments on the Hydra entry point with the override they mean,
    and other tools' command forms (``npu-recipes train my.yaml``) with the line to type instead.

    ``python -m npu_recipes --model X`` would otherwise get Hydra's argparse usage screen, and a bare
    ``my.yaml`` Hydra's "missing EQUAL".

    Raises:
        UserError: an argument starting with ``--`` that is none of Hydra's options; a bare recipe
            file (``*.yaml``/``*.yml``), ``help``, or a stage name as a word.
    """
    from hydra._internal.utils import get_args_parser

    _check_bare_words(argv)
    _, unknown = get_args_parser().parse_known_args(argv)
    for argument in unknown:
        if not argument.startswith("-") or argument.lstrip("-")[:1].isdigit():
            continue
        index = argv.index(argument)
        following = argv[index + 1] if index + 1 < len(argv) else None
        meant = swift.hydra_hint(argument, following)
        name = argument.split("=")[0]
        if meant is not None:
            raise UserError(
                f"{name} is a swift-style flag; python -m npu_recipes takes key=value overrides",
                fix=f"write {meant}, or use the swift-style command: npu-recipes sft|infer|export|deploy {name} ...",
            )
        raise UserError(
            f"unknown option {name}",
            fix="overrides are key=value (npu-recipes --help); swift-style flags go after npu-recipes sft|infer|export|deploy",
        )


def _check_bare_words(argv: List[str]) -> None:
    """Refuse the bare words other tools take (LLaMA-Factory's ``train my.yaml``, a recipe file, ``help``,
    a stage name), saying what to type: ``+recipe=FILE``, ``--help`` or ``stage=NAME``."""
    meant: List[str] = []
    problems: List[str] = []
    for index, argument in enumerate(argv):
        after_option = index > 0 and argv[index - 1].startswith("-") and "=" not in argv[index - 1]
        if argument.startswith(("-", "+", "~")) or "=" in argument or after_option:  # after_option: --cfg job, -cn NAME
            meant.append(argument)
        elif argument.endswith(_RECIPE_SUFFIXES):
            problems.append(f"{argument!r} is a recipe file, which is selected with +recipe=FILE")
            meant.append(f"+recipe={argument}")
        elif argument == "help":
            raise UserError("'help' is not a subcommand", fix="write npu-recipes --help")
        elif argument == "train":
            problems.append("'train' is not a subcommand (training is what a run does unless stage= says otherwise)")
        elif argument in STAGES:
            problems.append(f"{argument!r} is a stage, which is chosen with stage={argument}")
            meant.append(f"stage={argument}")
        else:
            meant.append(argument)
    if problems:
        raise UserError("; ".join(problems), fix=f"write {shlex.join(['npu-recipes', *meant])}")
