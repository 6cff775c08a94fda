"""``python -m npu_recipes [+recipe=NAME] [key=value ...]``: compose, validate, run.

With no arguments at all it runs the ``demo`` recipe.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from npu_recipes import config as config_module
from npu_recipes import checkpoints, paths, runner
from npu_recipes.errors import Interrupted, NothingToDo, Terminated, UserError, report_and_exit


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
        config = config_module.validate(cfg)
        runner.run(config, fresh_output_dir)
    except UserError as error:
        report_and_exit(error)
    except Interrupted as stop:
        print(f"npu_recipes: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except NothingToDo as done:
        print(f"npu_recipes: {done}", file=sys.stderr, flush=True)
    except OSError as error:
        if error.errno not in checkpoints.OUT_OF_SPACE:
            raise
        # Outside training (which names its checkpoint, see stages/train.py): building the demo
        # data or a tiny model, tokenizing into HF datasets' cache, writing run records.
        report_and_exit(UserError(
            f"no space left on the device while writing {error.filename or 'a file'} ({error.strerror})",
            fix="free space there (df -h), or move the cache (NPU_RECIPES_CACHE, HF_DATASETS_CACHE) or output_dir to a larger disk",
        ))


def main() -> None:
    """Console entry point (``python -m npu_recipes`` and ``npu-recipes``)."""
    from hydra._internal.utils import get_args_parser

    if len(sys.argv) == 1:
        sys.argv.append("+recipe=demo")
    setup_logging()
    config_module.register()
    args = get_args_parser().parse_args(sys.argv[1:])
    try:
        config_module.check_overrides(args.overrides, multirun=args.multirun)
        if not (args.multirun or args.config_name or args.config_path or args.config_dir):
            config_module.compose_dictconfig(args.overrides)
    except UserError as error:
        report_and_exit(error)
    try:
        _compose_and_run()
    except KeyboardInterrupt:
        print("npu_recipes: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Terminated as stop:
        print("npu_recipes: terminated (SIGTERM)", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
