"""Composition: recipes as a Hydra group, and checks of command-line overrides before Hydra composes.

Hydra composes ``conf/config.yaml`` (whose defaults list starts with the :class:`~npu_recipes.config.schema.RecipeConfig`
schema) with the chosen group options and ``+recipe=NAME``. Before Hydra runs,
:func:`check_overrides` looks at each command-line override so that a misspelt key or an unknown
group option fails with the valid choices and the closest match; :func:`compose` then composes and
validates (:func:`npu_recipes.config.validate.validate`) exactly as the CLI does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
import typing
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf
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


_stored: Dict[str, int] = {}
"""Recipe (or base block) name -> modification time (ns) of the file stored in Hydra's ConfigStore."""
_SCHEMA = ""
"""The key of :data:`_stored` that says the schema and the resolver are registered."""


def register(recipes: Iterable[str] = ()) -> None:
    """Register the schema, the ``${npu_cache:NAME}`` resolver and the recipes named in ``recipes`` with Hydra.

    Recipes live in the top-level ``recipes/`` directory (a name users look for) rather than in
    ``conf/recipe/``, so they are stored as the ``recipe`` group under the ``_global_`` package:
    ``+recipe=NAME`` then works exactly like Hydra's "configuring experiments" pattern. Each
    recipe's ``recipe`` key is set to its file name, so ``--cfg job`` shows it too. The shared blocks
    in ``recipes/base/`` are stored as ``recipe/base/NAME``, which a recipe includes with ``- base/NAME``.

    Only the recipes a command selects (and the blocks they include) are read, each checked by
    :func:`load_recipe`, so a broken file under ``recipes/`` fails only the commands that use it.
    A recipe is read again only when its file changed. Names that are not files are skipped
    (:func:`check_overrides` names the choices).

    Raises:
        UserError: a selected recipe, or a block it includes, is broken (see :func:`load_recipe`).
    """
    if _SCHEMA not in _stored:
        schema.register()
        OmegaConf.register_new_resolver("npu_cache", lambda name: str(paths.cache_dir() / name), replace=True)
        OmegaConf.register_new_resolver("launch_env", _launch_env, replace=True)
        _stored[_SCHEMA] = 0
    pending = [name for name in recipes if _recipe_file(name).is_file()]
    while pending:
        name = pending.pop()
        path = _recipe_file(name)
        stamp = path.stat().st_mtime_ns
        if _stored.get(name) == stamp:
            continue
        node = load_recipe(name)
        pending.extend(_included(name, entry) for entry, _ in _included_recipes(node))
        if "/" not in name:
            node.recipe = name
        group, _, stem = f"{RECIPE_GROUP}/{name}".rpartition("/")
        ConfigStore.instance().store(group=group, name=stem, node=node, package="_global_")
        _stored[name] = stamp


def selected_recipes(overrides: List[str]) -> List[str]:
    """The recipe names ``+recipe=NAME`` overrides select (every value of a ``--multirun`` sweep).

    Raises:
        UserError: an override that does not parse.
    """
    return [value for override in _parse(overrides) if override.key_or_group == RECIPE_GROUP for value in _values(override)]


def _recipe_file(name: str) -> Path:
    return paths.recipes_dir() / f"{name}.yaml"


def _included(name: str, entry: str) -> str:
    """The recipe file name a plain defaults-list ``entry`` of recipe ``name`` refers to: Hydra reads
    it relative to the including recipe's own group (``base/seed_sft`` from ``recipes/``)."""
    return posixpath.join(posixpath.dirname(name), entry)


def _included_recipes(node: DictConfig) -> List[Tuple[str, int]]:
    """``(name, position)`` of the recipes and base blocks in a recipe's defaults list (its plain entries)."""
    defaults = node.get("defaults") if isinstance(node, DictConfig) else None
    if not isinstance(defaults, ListConfig):
        return []
    return [(entry, index) for index, entry in enumerate(defaults) if isinstance(entry, str) and entry != "_self_"]


def load_recipe(name: str) -> DictConfig:
    """Read and check ``recipes/NAME.yaml`` (``base/NAME`` for a shared block) before Hydra sees it.

    Every mistake is one :class:`~npu_recipes.errors.UserError` naming the file and the line, with a
    fix about the file: YAML that does not parse, a file that is not a mapping of config keys, a key
    the schema lacks (with the closest valid key), an unknown group option or included recipe in its
    defaults list (with the closest option), or a value of the wrong type.

    Raises:
        UserError: as above.
    """
    return _read_recipe(_recipe_file(name), name)


def _read_recipe(path: Path, name: str) -> DictConfig:
    """:func:`load_recipe` of the file at ``path``, stored as recipe ``name`` (whose group its defaults
    list's plain entries are relative to); messages name ``path`` as given."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"recipe file {path} is unreadable ({error})", fix="save it as UTF-8 text, or delete it") from None
    try:
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
        node = OmegaConf.create(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path} line {_yaml_error_line(error)}: not valid YAML ({_yaml_problem(error)})",
                        fix=f"fix that line of {path} (a recipe is a YAML mapping of config keys, like recipes/demo.yaml)") from None
    except OmegaConfBaseException as error:
        raise UserError(f"{path}: {str(error).splitlines()[0]}", fix=f"fix {path} (a recipe is a YAML mapping of config keys)") from None
    except RecursionError:
        raise UserError(f"{path} holds a YAML alias (*name) that refers to the value containing it", fix=f"remove that alias from {path}") from None
    if tree is None:  # empty, or comments only: a recipe that changes nothing
        return OmegaConf.create({})
    if not isinstance(tree, yaml.MappingNode) or not isinstance(node, DictConfig):
        found = "a list" if isinstance(tree, yaml.SequenceNode) else "a single value"
        line = tree.start_mark.line + 1
        raise UserError(f"{path} line {line}: holds {found}, not a mapping of config keys",
                        fix=f"write {path} as `key: value` lines under `# @package _global_`, like recipes/demo.yaml")
    lines = _key_lines(tree)
    _check_recipe_defaults(name, path, node, lines)
    _check_recipe_keys(path, node, lines)
    return node


def _yaml_error_line(error: yaml.YAMLError) -> int:
    """The line to name for a YAML error: where the parser gave up, or, when it gave up at the end of
    the file (an unclosed bracket or quote), where the unfinished construct starts."""
    problem, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    at_end = "<stream end>" in str(getattr(error, "problem", "")) or "end of stream" in str(getattr(error, "problem", ""))
    mark = context if (at_end and context is not None) or problem is None else problem
    return mark.line + 1 if mark is not None else 1


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark, context, started = getattr(error, "problem_mark", None), getattr(error, "context", None), getattr(error, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    opened = f", {context} that starts at line {started.line + 1}, column {started.column + 1}" if context and started is not None else ""
    return f"{problem}{where}{opened}"


def _key_lines(tree: "yaml.MappingNode", prefix: str = "") -> Dict[str, int]:
    """Dotted key (``defaults[2]`` for a defaults entry) -> 1-based line of a recipe's YAML tree."""
    lines: Dict[str, int] = {}
    for key_node, value_node in tree.value:
        dotted = f"{prefix}{key_node.value}"
        lines[dotted] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode):
            lines.update(_key_lines(value_node, dotted + "."))
        elif isinstance(value_node, yaml.SequenceNode) and dotted == "defaults":
            lines.update({f"defaults[{index}]": item.start_mark.line + 1 for index, item in enumerate(value_node.value)})
    return lines


def _recipe_fix(path: Path, what: str) -> str:
    return f"correct {what} in {path}; `python -m npu_recipes --cfg job` prints every key and its type"


def _check_recipe_defaults(name: str, path: Path, node: DictConfig, lines: Dict[str, int]) -> None:
    defaults = node.get("defaults")
    if defaults is None:
        return
    if not isinstance(defaults, ListConfig):
        raise UserError(f"{path} line {lines.get('defaults', 1)}: defaults is not a list",
                        fix=f"write the defaults list in {path} as `- override /GROUP: OPTION` lines")
    groups = group_options()
    known = sorted(p.relative_to(paths.recipes_dir()).with_suffix("").as_posix() for p in paths.recipes_dir().glob("**/*.yaml"))
    for entry, index in _included_recipes(node):
        if _included(name, entry) not in known:
            raise UserError(f"{path} line {lines.get(f'defaults[{index}]', 1)}: the defaults list includes {entry!r}, which is not "
                            f"a recipe or a block in recipes/base/{did_you_mean(entry, known)}; available: {', '.join(known)}",
                            fix=f"correct that entry of the defaults list in {path}")
    for index, entry in enumerate(defaults):
        if not isinstance(entry, DictConfig) or len(entry) != 1:
            continue
        ((key, option),) = entry.items()
        group = str(key).removeprefix("override").strip().lstrip("/")
        line = lines.get(f"defaults[{index}]", 1)
        if group not in groups or group == RECIPE_GROUP:
            choices = [g for g in groups if g != RECIPE_GROUP]
            raise UserError(f"{path} line {line}: the defaults list names {group!r}, which is not a config group"
                            f"{did_you_mean(group, choices)}; groups: {', '.join(sorted(choices))}",
                            fix=f"correct that entry of the defaults list in {path} (`- override /GROUP: OPTION`)")
        if str(option) not in groups[group]:
            raise UserError(f"{path} line {line}: {_unknown_option(group, str(option), groups[group])}",
                            fix=f"correct that entry of the defaults list in {path} (the options are the files in conf/{group}/)")


def _check_recipe_keys(path: Path, node: DictConfig, lines: Dict[str, int]) -> None:
    body = OmegaConf.masked_copy(node, [key for key in node if key != "defaults"])
    for key in body:
        if "." in str(key) and _check_key(str(key), where=(path, lines.get(str(key), 1))):
            # YAML keeps `train.learning_rate: 1` as one key named with a dot, which no section has.
            *sections, leaf = str(key).split(".")
            raise UserError(f"{path} line {lines.get(str(key), 1)}: {key!r} is a dotted key, which a YAML file keeps as one name",
                            fix=f"nest it in {path}: {' then '.join(f'`{part}:`' for part in sections)} on a line of its own, "
                            f"then `{leaf}: VALUE` below, each indented under the line before")
    for dotted in _leaf_keys(body):
        line = lines.get(dotted, 1)
        _check_key(dotted, where=(path, line))
        if _is_section(dotted) and not isinstance(OmegaConf.select(body, dotted, throw_on_resolution_failure=False), DictConfig):
            raise UserError(f"{path} line {line}: {dotted} is a section of keys ({dotted}.KEY: VALUE), not a value",
                            fix=_recipe_fix(path, dotted))
    try:
        OmegaConf.merge(schema.structured(), body)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        value = OmegaConf.select(body, key, default=None, throw_on_resolution_failure=False) if key else None
        shown = f"{key}={OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value!r}: " if key else ""
        raise UserError(f"{path} line {lines.get(key, 1)}: {shown}{str(error).splitlines()[0]}",
                        fix=_recipe_fix(path, f"the value of {key or 'that key'}")) from None


def _leaf_keys(node: DictConfig, prefix: str = "") -> List[str]:
    """Every dotted key of ``node`` down to the values (mappings inside schema sections are walked into)."""
    keys = []
    for key, value in node.items_ex(resolve=False):
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, DictConfig) and _is_section(dotted):
            keys.extend(_leaf_keys(value, dotted + "."))
    return keys


def _is_section(dotted: str) -> bool:
    node_type: Optional[type] = schema.RecipeConfig
    for part in dotted.split("."):
        fields = {f.name: _unwrap_optional(f.type) for f in dataclasses.fields(node_type)} if dataclasses.is_dataclass(node_type) else {}
        node_type = fields.get(part)
    return dataclasses.is_dataclass(node_type)


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


_RECIPE_FILE_SUFFIXES = (".yaml", ".yml")
_recipe_files: Set[str] = set()
"""Option names of the recipe files registered by :func:`recipe_file_overrides` in this process."""


def is_recipe_file(value: str) -> bool:
    """True when ``+recipe=value`` names a file (a path with a directory, or an existing ``*.yaml``) rather than a shipped recipe."""
    if value.endswith(_RECIPE_FILE_SUFFIXES) and Path(value).expanduser().is_file():
        return True
    return "/" in value or value.startswith("~")


def recipe_file_overrides(overrides: List[str]) -> List[str]:
    """``overrides`` with ``+recipe=FILE`` (a copy made by ``npu-recipes cp``, or any recipe file)
    registered as a recipe and replaced by the name it was registered under.

    The file is read and checked like a shipped recipe (:func:`load_recipe`: file and line, the
    closest key or option): a mapping in the ``_global_`` package, whose defaults list may include
    the shared blocks (``- base/seed_sft``); its ``recipe`` key is the file's stem, so runs go to
    ``outputs/<stem>/<time>``.

    Raises:
        UserError: the file does not exist, or anything :func:`load_recipe` refuses.
    """
    rewritten = []
    for override in overrides:
        key, equals, value = override.partition("=")
        if key != f"+{RECIPE_GROUP}" or not equals or not is_recipe_file(value):
            rewritten.append(override)
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"recipe file {value} does not exist", fix="check the path (npu-recipes cp NAME FILE makes one)")
        name = "file-" + hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:12]
        node = _read_recipe(path, name)
        node.recipe = path.stem
        register([_included(name, entry) for entry, _ in _included_recipes(node)])
        ConfigStore.instance().store(group=RECIPE_GROUP, name=name, node=node, package="_global_")
        _recipe_files.add(name)
        rewritten.append(f"+{RECIPE_GROUP}={name}")
    return rewritten


def _unwrap_optional(annotation):
    if typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else annotation
    return annotation


def _check_key(dotted: str, where: Optional[Tuple[Path, int]] = None) -> bool:
    """Refuse a key the schema does not have; True when ``dotted`` is a schema field itself (False
    for a key inside a free-form field such as ``reference`` or ``adapters``). ``where`` is the
    recipe file and line the key is written on (None: the command line)."""
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
            if not walked and where is None:
                candidates += list(group_options())
            problem = f"unknown config key {full!r}{did_you_mean(full, candidates)} (keys under {section}: {', '.join(sorted(fields))})"
            if where is not None:
                raise UserError(f"{where[0]} line {where[1]}: {problem}", fix=_recipe_fix(where[0], "that key"))
            raise UserError(problem, fix="check the spelling; `python -m npu_recipes --cfg job` prints the whole config")
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


_command_line_keys: List[str] = []


def command_line_keys() -> FrozenSet[str]:
    """The config keys (``model.device_map``) and groups (``model``) the command line last checked by
    :func:`check_overrides` sets: the user's explicit choices, which win over settings a stage reads
    from a training run's resolved.yaml (the base model of merge, infer and serve)."""
    return frozenset(_command_line_keys)


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
    parsed = _parse(overrides)
    groups = group_options()
    _command_line_keys[:] = [override.key_or_group for override in parsed]
    recipes = []
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith("hydra."):
            continue
        _check_override_form(override, multirun, key in groups)
        if key in groups:
            if key == RECIPE_GROUP:
                recipes.append(override.input_line)
            _check_group_override(override, groups[key] + (sorted(_recipe_files) if key == RECIPE_GROUP else []))
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


def _parse(overrides: List[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise UserError(f"cannot parse override: {error}", fix="write overrides as key=value") from None


def _values(override) -> List[str]:
    return list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]


def _unknown_option(group: str, value: str, options: List[str]) -> str:
    noun = "recipe" if group == RECIPE_GROUP else f"option for {group}"
    return f"unknown {noun} {value!r}{did_you_mean(value, options)}; available: {', '.join(options)}"


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
    for value in _values(override):
        if value not in options:
            raise UserError(
                _unknown_option(key, value, options),
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

    register(selected_recipes(overrides))
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
    overrides = recipe_file_overrides(overrides)
    check_overrides(overrides)
    return validate(compose_dictconfig(overrides))
