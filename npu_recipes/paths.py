"""Where the package finds its config groups and recipes, and where it caches built artefacts (a leaf module: imports nothing of the package)."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def _first_existing(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"none of {[str(c) for c in candidates]} exists; reinstall npu_recipes")


def conf_dir() -> Path:
    """The Hydra config-group directory: ``npu_recipes/conf`` in a wheel, ``conf/`` in a checkout."""
    return _first_existing(_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf")


def recipes_dir() -> Path:
    """The shipped recipes: ``npu_recipes/recipes`` in a wheel, ``recipes/`` in a checkout."""
    return _first_existing(_PACKAGE_DIR / "recipes", _PACKAGE_DIR.parent / "recipes")


def cache_dir() -> Path:
    """Cache for locally built artefacts (tiny model, generated datasets).

    ``$NPU_RECIPES_CACHE`` if set, else ``$XDG_CACHE_HOME/npu_recipes``, else ``~/.cache/npu_recipes``.
    """
    explicit = os.environ.get("NPU_RECIPES_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "npu_recipes"
