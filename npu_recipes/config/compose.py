"""Composition: recipes as a Hydra group, and checks of command-line overrides before Hydra composes.

Hydra composes ``conf/config.yaml`` (whose defaults list starts with the :class:`~npu_recipes.config.schema.RecipeConfig`
schema) with the chosen group options and ``+recipe=NAME``. Before Hydra runs,
:func:`check_overrides` looks at each command-line override so that a misspelt key or an unknown
group option fails with the valid choices and the closest match; :func:`compose` then composes and
validates (:func:`npu_recipes.config.validate.validate`) exactly as the CLI does.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from npu_recipes import paths
from npu_recipes.config import schedulers, schema
from npu_recipes.config.schema import did_you_mean
from npu_recipes.config.validate import validate
from npu_recipes.errors import UserError

RECIPE_GROUP = "recipe"
BASE_RECIPES = "base"
"""Subdirectory of ``recipes/`` with blocks recipes share through their defaults list (``- base/NAME``);
they are not recipes themselves."""


def recipe_names() -> List[str]:
    """Names of the shipped recipes (``recipes/*.yaml`` stems), sorted."""
    return sorted(p.stem for p in paths.recipes_dir().glob("*.yaml"))


_registered: List[tuple] = []


def register() -> None:
    """Register the schema, the ``${npu_cache:NAME}`` resolver and every shipped recipe with Hydra.

    Recipes live in the top-level ``recipes/`` directory (a name users look for) rather than in
    ``conf/recipe/``, so they are stored as the ``recipe`` group under the ``_global_`` package:
    ``+recipe=NAME`` then works exactly like Hydra's "configuring experiments" pattern. Each
    recipe's ``recipe`` key is set to its file name, so ``--cfg job`` shows it too. The shared blocks
    in ``recipes/base/`` are stored as ``recipe/base/NAME``, which a recipe includes with ``- base/NAME``.
    """
    files = sorted([*paths.recipes_dir().glob("*.yaml"), *(paths.recipes_dir() / BASE_RECIPES).glob("*.yaml")])
    stamp = tuple((str(path), path.stat().st_mtime_ns) for path in files)
    if _registered and _registered[0] == stamp:
        # Registering reads and converts every recipe (a third of a compose): once per process,
        # again only when a recipe file changed.
        return
    schema.register()
    OmegaConf.register_new_resolver("npu_cache", lambda name: str(paths.cache_dir() / name), replace=True)
    OmegaConf.register_new_resolver("launch_env", _launch_env, replace=True)
    store = ConfigStore.instance()
    for path in sorted((paths.recipes_dir() / BASE_RECIPES).glob("*.yaml")):
        store.store(group=f"{RECIPE_GROUP}/{BASE_RECIPES}", name=path.stem, node=OmegaConf.load(path), package="_global_")
    for path in sorted(paths.recipes_dir().glob("*.yaml")):
        node = OmegaConf.load(path)
        node.recipe = path.stem
        store.store(group=RECIPE_GROUP, name=path.stem, node=node, package="_global_")
    _registered[:] = [stamp]


def _launch_env(key: str, default=None):
    """``${launch_env:KEY,DEFAULT}``: torchrun setting ``KEY`` from the scheduler's variables (:mod:`npu_recipes.config.schedulers`)."""
    found = schedulers.setting(key, os.environ)
    return default if found is None else found[0]


def group_options() -> Dict[str, List[str]]:
    """Config group name -> available option names (``conf/<group>/*.yaml``, plus ``recipe``)."""
    options = {
        group.name: sorted(p.stem for p in group.glob("*.yaml"))
        for group in paths.conf_dir().iterdir()
        if group.is_dir()
    }
    options[RECIPE_GROUP] = recipe_names()
    return options


def _unwrap_optional(annotation):
    if typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else annotation
    return annotation


def _check_key(dotted: str) -> bool:
    """Refuse a key the schema does not have; True when ``dotted`` is a schema field itself (False
    for a key inside a free-form field such as ``reference`` or ``adapters``)."""
    node_type: Optional[type] = schema.RecipeConfig
    walked: List[str] = []
    for part in dotted.split("."):
        if node_type is None or not dataclasses.is_dataclass(node_type):
            return False
        fields = {f.name: _unwrap_optional(f.type) for f in dataclasses.fields(node_type)}
        if part not in fields:
            section = ".".join(walked) or "the top level"
            candidates = [".".join(walked + [name]) for name in fields] if walked else list(fields)
            full = ".".join(walked + [part])
            if not walked:
                candidates += list(group_options())
            raise UserError(
                f"unknown config key {full!r}{did_you_mean(full, candidates)} (keys under {section}: "
                f"{', '.join(sorted(fields))})",
                fix="check the spelling; `python -m npu_recipes --cfg job` prints the whole config",
            )
        walked.append(part)
        node_type = fields[part]
    return True


def _check_type(dotted: str, value, text: str) -> None:
    probe = schema.structured()
    try:
        OmegaConf.update(probe, dotted, value, merge=True)
    except OmegaConfBaseException as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"{dotted}={text}: {reason}", fix=f"give {dotted} a value of the type shown by `--cfg job`") from None


def check_overrides(overrides: List[str], multirun: bool = False) -> None:
    """Check command-line overrides against the schema and the config groups before Hydra composes.

    Args:
        overrides: Hydra overrides as typed (``key=value``, ``group=option``, ``+recipe=NAME``).
        multirun: True under ``--multirun``/``-m``, where ``key=a,b`` sweeps.

    Raises:
        UserError: an unparsable override, an unknown key, an unknown group option, a recipe
            selected without ``+`` or twice, a deletion (``~KEY``), a ``+`` on a key or group that
            exists already, or a sweep without ``--multirun`` (names the override, the valid
            choices and the closest match).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise UserError(f"cannot parse override: {error}", fix="write overrides as key=value") from None
    groups = group_options()
    recipes = []
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith("hydra."):
            continue
        _check_override_form(override, multirun, key in groups)
        if key in groups:
            if key == RECIPE_GROUP:
                recipes.append(override.input_line)
            _check_group_override(override, groups[key])
            continue
        is_field = _check_key(key)
        if override.is_add() and is_field:
            raise UserError(
                f"{override.input_line}: {key} exists already (every schema key does), so it cannot be added with +",
                fix=f"drop the +: {override.input_line.lstrip('+')}",
            )
        if not override.is_sweep_override():
            _check_type(key, override.value(), override.get_value_element_as_str())
    if len(recipes) > 1:
        raise UserError(f"only one recipe per run, got {', '.join(recipes)}", fix="keep one +recipe=NAME and override its settings with key=value")


def _check_override_form(override, multirun: bool, is_group: bool) -> None:
    line = override.input_line
    if override.is_delete():
        raise UserError(
            f"{line}: deleting config entries (~KEY) is not supported",
            fix="set the key to another value (KEY=VALUE), or choose another option of its config group",
        )
    if override.is_sweep_override() and not multirun:
        raise UserError(
            f"{line}: several values, which would sweep over them, but this is a single run",
            fix="add --multirun (-m) for one run per value; for a list write key=[a,b], for text with commas quote it: key='a,b'",
        )
    if is_group and (override.is_add() or override.is_force_add()) and override.key_or_group != RECIPE_GROUP:
        raise UserError(
            f"{line}: {override.key_or_group} always has an option (its default), so it cannot be added with + or ++",
            fix=f"drop the plus: {line.lstrip('+')}",
        )


def _check_group_override(override, options: List[str]) -> None:
    key = override.key_or_group
    if key == RECIPE_GROUP and not override.is_add():
        raise UserError(
            f"recipes are selected with a leading plus: +recipe={override.get_value_element_as_str()}",
            fix="write +recipe=NAME",
        )
    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
    for value in values:
        if value not in options:
            noun = "recipe" if key == RECIPE_GROUP else f"option for {key}"
            raise UserError(
                f"unknown {noun} {value!r}{did_you_mean(value, options)}; available: {', '.join(options)}",
                fix=f"choose one of the names above (they are the files in "
                f"{'recipes/' if key == RECIPE_GROUP else 'conf/' + key + '/'})",
            )


def compose_dictconfig(overrides: List[str]) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` as the CLI does (Hydra's compose API), unvalidated.

    The CLI calls this once before Hydra's own composition, so that a composition error
    :func:`check_overrides` did not foresee (e.g. merging a mapping into ``reference``) is reported
    like every other mistake.

    Raises:
        UserError: Hydra or OmegaConf refused the composition (their message, without a traceback).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(paths.conf_dir()), job_name="npu_recipes"):
            return hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        text = f"{error} {error.__cause__ or ''}"
        reason = " ".join(line.strip() for line in text.splitlines() if line.strip())
        raise UserError(
            f"cannot compose the config: {reason}",
            fix="correct that override (override syntax: https://hydra.cc/docs/advanced/override_grammar/basic/)",
        ) from None


def compose(overrides: List[str]) -> schema.RecipeConfig:
    """Compose and validate exactly as the CLI does, without running a stage.

    For tests and tools (docs generation, planning) that need a recipe's resolved settings.

    Raises:
        UserError: as :func:`check_overrides`, :func:`compose_dictconfig` and :func:`validate`.
    """
    register()
    check_overrides(overrides)
    return validate(compose_dictconfig(overrides))
