"""``python -m npu_recipes [+recipe=NAME] [key=value ...]`` and ``npu-recipes``: compose, validate, run.

With no arguments at all it runs the ``demo`` recipe. A first argument naming a subcommand
(``ls``, ``show``, ``cp``, or swift's ``sft``/``infer``/``export``/``deploy``) goes to
:mod:`npu_recipes.commands`; swift's commands come back as overrides and run here like any other.
Every way a command ends (bad input, a stop signal, nothing to do) is turned into its exit status
and message by one table, :func:`npu_recipes.errors.exit_for`.

A single run composes once with Hydra's compose API and runs the stage directly; only Hydra's own
options (``--multirun``, ``--cfg``, ``--info``, ...) and ``hydra.*`` overrides go through
``@hydra.main``. Nothing on the way to a config error, ``--help``, ``ls`` or ``show`` imports
torch, transformers or datasets.
"""

from __future__ import annotations

import logging
import sys
from typing import List

from npu_recipes import commands, errors, paths
from npu_recipes.config import compose


def setup_logging() -> None:
    """Log INFO and above to stderr as `HH:MM:SS LEVEL logger: message`, quieting chatty libraries."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # huggingface_hub gives its loggers a stream handler of their own when it is imported; passed on
    # to ours too, each of its warnings (an offline download's retries) would print twice.
    logging.getLogger("huggingface_hub").propagate = False


def _compose_and_run_with_hydra(argv: List[str]) -> None:
    """Run ``argv`` through ``@hydra.main``: sweeps (``-m``), ``--cfg``, ``--info`` and Hydra's other options."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig, OmegaConf

    from npu_recipes import runner
    from npu_recipes.config.validate import validate

    @hydra.main(version_base="1.3", config_path=str(paths.conf_dir()), config_name="config")
    def compose_and_run(cfg: DictConfig) -> None:
        try:
            fresh_output_dir = "${now:" in OmegaConf.to_container(cfg, resolve=False)["output_dir"]
            hydra_config = HydraConfig.get()
            if fresh_output_dir and hydra_config.mode == RunMode.MULTIRUN:
                # One run directory per job: the job's own sweep subdirectory (outputs/multirun/<time>/<job number>).
                cfg.output_dir, fresh_output_dir = hydra_config.runtime.output_dir, False
            runner.run(validate(cfg), fresh_output_dir)
        except (errors.UserError, errors.Interrupted, errors.NothingToDo, OSError) as error:
            # KeyboardInterrupt and Terminated pass through Hydra and are handled in main().
            errors.exit_with(error)

    sys.argv = [sys.argv[0], *argv]
    compose_and_run()


def run_overrides(argv: List[str]) -> None:
    """Compose ``argv`` (Hydra overrides, possibly with Hydra's options) and run the stage it selects.

    Raises:
        UserError: a swift-style flag, a bad override, or bad input found by the stage.
    """
    from hydra._internal.utils import get_args_parser

    commands.check_hydra_arguments(argv)
    argv = compose.recipe_file_overrides(argv)
    args = get_args_parser().parse_args(argv)
    compose.check_overrides(args.overrides, multirun=args.multirun)
    compose.register(compose.selected_recipes(args.overrides))
    hydra_options = [a for a in argv if a.startswith("-")] or [a for a in args.overrides if a.lstrip("+~").startswith("hydra.")]
    if hydra_options:
        if not (args.multirun or args.config_name or args.config_path or args.config_dir):
            compose.compose_dictconfig(args.overrides)
        _compose_and_run_with_hydra(argv)
        return
    from omegaconf import OmegaConf

    from npu_recipes import runner
    from npu_recipes.config.validate import validate

    composed = compose.compose_dictconfig(args.overrides)
    fresh_output_dir = "${now:" in OmegaConf.to_container(composed, resolve=False)["output_dir"]
    runner.run(validate(composed), fresh_output_dir)


def main() -> None:
    """Console entry point (``python -m npu_recipes`` and ``npu-recipes``)."""
    argv = sys.argv[1:] or ["+recipe=demo"]
    setup_logging()
    try:
        if argv[0] in commands.SUBCOMMANDS:
            argv = commands.dispatch(argv)
        elif "-h" in argv or "--help" in argv:
            print(commands.help_text())
            argv = None
        if argv is not None:
            run_overrides(argv)
        # Inside the try: a reader that closed stdout early (`| head`) fails this flush.
        sys.stdout.flush()
    except (errors.UserError, errors.Interrupted, errors.NothingToDo, OSError, KeyboardInterrupt, errors.Terminated) as error:
        errors.exit_with(error)
