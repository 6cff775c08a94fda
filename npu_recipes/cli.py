"""``python -m npu_recipes [+recipe=NAME] [key=value ...]`` and ``npu-recipes``: compose, validate, run.

With no arguments at all it runs the ``demo`` recipe. Every way a command ends (bad input, a
stop signal, nothing to do) is turned into its exit status and message by one table,
:func:`npu_recipes.errors.exit_for`.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from npu_recipes import errors, paths, runner
from npu_recipes.config import compose
from npu_recipes.config.validate import validate


def setup_logging() -> None:
    """Log INFO and above to stderr as `HH:MM:SS LEVEL logger: message`, quieting chatty libraries."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path=str(paths.conf_dir()), config_name="config")
def _compose_and_run(cfg: DictConfig) -> None:
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


def main() -> None:
    """Console entry point (``python -m npu_recipes`` and ``npu-recipes``)."""
    from hydra._internal.utils import get_args_parser

    if len(sys.argv) == 1:
        sys.argv.append("+recipe=demo")
    setup_logging()
    args = get_args_parser().parse_args(sys.argv[1:])
    try:
        compose.check_overrides(args.overrides, multirun=args.multirun)
        compose.register(compose.selected_recipes(args.overrides))
        if not (args.multirun or args.config_name or args.config_path or args.config_dir):
            compose.compose_dictconfig(args.overrides)
        _compose_and_run()
    except (errors.UserError, KeyboardInterrupt, errors.Terminated) as error:
        errors.exit_with(error)
