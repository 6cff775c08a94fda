"""Regenerate tests/golden/resolved_recipes/: `python -m tests.golden.regenerate_resolved` from the repo root.

Composes every recipe with ``output_dir=/runs/golden`` and ``NPU_RECIPES_CACHE=/cache`` and writes
``resolved.to_yaml`` of the result to NAME.yaml. Run it only when a deliberate change alters what a
recipe resolves to (a new key, a new default), check that `git diff` shows only that change, and say
why in the commit message.
"""

from __future__ import annotations

import os
from pathlib import Path

FOLDER = Path(__file__).with_name("resolved_recipes")


def main() -> None:
    os.environ["NPU_RECIPES_CACHE"] = "/cache"
    from npu_recipes.config import compose, resolved

    for name in compose.recipe_names():
        config = compose.compose([f"+recipe={name}", "output_dir=/runs/golden"])
        (FOLDER / f"{name}.yaml").write_text(resolved.to_yaml(config))
        print(f"wrote {FOLDER / name}.yaml")


if __name__ == "__main__":
    main()
