"""``resolved.yaml``: the fully resolved config written into a run directory and read back by workers and later stages."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from omegaconf import OmegaConf

from npu_recipes.config import schema

RESOLVED = "resolved.yaml"
"""The resolved config's file name in a run directory."""


def to_plain(config: schema.RecipeConfig) -> dict:
    """``config`` as plain dicts and lists, every literal ``${`` escaped (see :func:`to_yaml`)."""
    return _escape_interpolations(dataclasses.asdict(config))


def from_plain(plain) -> schema.RecipeConfig:
    """A typed, frozen :class:`RecipeConfig` from plain dicts (schema defaults for what ``plain`` lacks)."""
    return OmegaConf.to_object(OmegaConf.merge(schema.structured(), plain))


def load_resolved(path: Path) -> schema.RecipeConfig:
    """Load a run directory's ``resolved.yaml`` back into a typed :class:`RecipeConfig`.

    Workers and later stages call this instead of composing again.
    """
    return from_plain(OmegaConf.load(path))


def _escape_interpolations(value):
    """``value`` with every ``${`` in its strings escaped for OmegaConf (``\\${``, backslashes before
    it doubled), so that text which only looks like an interpolation stays text when read back."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda match: match.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {key: _escape_interpolations(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape_interpolations(item) for item in value]
    return value


def to_yaml(config: schema.RecipeConfig) -> str:
    """The YAML text of a resolved config (as written to ``resolved.yaml``); :func:`load_resolved`
    reads back an equal config, also when a value contains a literal ``${`` (an escaped
    interpolation on the command line, e.g. in a prompt template)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_plain(config)))

