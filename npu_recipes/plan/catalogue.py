"""The recipe catalogue: one row per shipped recipe with the seed's figures and the planned memory.

``npu-recipes ls`` and ``make list`` print it, and docs/recipes.md is generated from it
(:mod:`npu_recipes.plan.recipes_page`). Planned memory comes from the planner (:mod:`npu_recipes.plan.planner`)
with each recipe's own settings, for the device its ``plan.target`` resolves to; the models'
config.json are the copies shipped in ``npu_recipes/model/configs/`` (nothing is downloaded), or the
model's local directory (the demo's tiny model is built locally).

Planning builds a model skeleton with torch, seconds per recipe, so ``make docs`` stores the rows
of the shipped recipes in ``catalogue.json`` beside this module, each under a digest of its input
files; listing reads them from there (no torch) and computes only rows whose inputs changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from npu_recipes import paths
from npu_recipes.config import compose
from npu_recipes.model import pretrained
from npu_recipes.plan import planner


@dataclass(frozen=True)
class Row:
    """One recipe. Memory in GiB per device (the seed's in GB as it reports them); None when unknown."""

    name: str
    make_target: str
    model: str
    devices: int
    parallelism: str
    seed_row: Optional[int]
    seed_memory_gb: Optional[float]
    seed_runtime_hours: Optional[float]
    planned_gib: Optional[float]
    planned_full_gib: Optional[float]
    target: str
    fits: Optional[bool]
    full_fits: Optional[bool]
    description: str


def _plan(config, model_dir: Optional[str]) -> Optional[planner.Plan]:
    if model_dir is None:
        return None
    return planner.make(model=config.model, train_type=config.train_type, lora=config.lora, train=config.train,
                        parallelism=config.parallelism, device=config.device, options=config.plan, model_dir=model_dir)


def _rounded(gib: float) -> float:
    """GiB to one decimal, or two significant digits below 1 GiB (the demo's model needs hundredths)."""
    return round(gib, 1) if gib >= 1 else float(f"{gib:.2g}")


def row(name: str) -> Row:
    """The :class:`Row` of recipe ``name``, computed now (its planned memory for ``train_type`` lora as shipped and full)."""
    config = compose.compose([f"+recipe={name}"])
    shipped = pretrained.shipped_config_dir(config.model.name_or_path)
    local = pretrained.is_built(config.model) or Path(config.model.name_or_path).expanduser().is_dir()
    model_dir = str(shipped) if shipped else (pretrained.fetch_config(config.model) if local else None)
    shipped_plan = _plan(config, model_dir)
    # Only train_type moves the estimate (the learning rate its option also sets does not).
    full_plan = _plan(dataclasses.replace(config, train_type="full"), model_dir)
    reference = config.reference
    world = config.parallelism.world_size
    return Row(
        name=name,
        make_target=name.replace("_", "-"),
        model=config.model.name_or_path if not local else Path(config.model.name_or_path).name,
        devices=world,
        parallelism=config.parallelism.name,
        seed_row=reference.get("seed_row"),
        seed_memory_gb=reference.get("max_memory_gb_per_device"),
        seed_runtime_hours=reference.get("runtime_hours"),
        planned_gib=None if shipped_plan is None else _rounded(shipped_plan.estimate.total_gib),
        planned_full_gib=None if full_plan is None else _rounded(full_plan.estimate.total_gib),
        target=shipped_plan.target.label if shipped_plan else "",
        fits=None if shipped_plan is None else shipped_plan.fits,
        full_fits=None if full_plan is None else full_plan.fits,
        description=config.description,
    )


CACHE = Path(__file__).with_name("catalogue.json")
"""The rows of the shipped recipes as ``make docs`` computed them, each under the digest of its inputs
(:func:`inputs_digest`); tests/test_catalogue.py checks that it is current."""


def inputs_digest(name: str) -> str:
    """SHA-256 of what recipe ``name``'s row is computed from besides code: its file, the shared blocks
    in ``recipes/base/``, every config group option in ``conf/`` and the shipped config.json copies."""
    files = [paths.recipes_dir() / f"{name}.yaml", *sorted((paths.recipes_dir() / compose.BASE_RECIPES).glob("*.yaml")),
             *sorted(paths.conf_dir().rglob("*.yaml")), *sorted(pretrained.SHIPPED_CONFIGS.glob("*/config.json"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(path.parent.parent)).encode())
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def _cached() -> Dict[str, dict]:
    try:
        return json.loads(CACHE.read_text())
    except (OSError, ValueError):
        return {}


def rows(cached: bool = True) -> List[Row]:
    """Every shipped recipe: the seed table's rows in its order, then the others by name.

    With ``cached`` (``npu-recipes ls``, ``make list``) a row comes from :data:`CACHE` when its
    inputs are unchanged, so listing needs neither torch nor a model skeleton; any other row
    (an edited or added recipe or option) is computed now. ``cached=False`` computes every row.
    """
    stored = _cached() if cached else {}
    found = []
    for name in compose.recipe_names():
        entry = stored.get(name)
        found.append(Row(**entry["row"]) if entry and entry.get("inputs") == inputs_digest(name) else row(name))
    return sorted(found, key=lambda r: (r.seed_row is None, r.seed_row or 0, r.name))


def cache_text(table: List[Row]) -> str:
    """The text of :data:`CACHE` for ``table`` (rows computed now)."""
    return json.dumps({r.name: {"inputs": inputs_digest(r.name), "row": dataclasses.asdict(r)} for r in table},
                      indent=1, sort_keys=True) + "\n"


def format_cell(value, unit: str = "") -> str:
    """A table cell: ``-`` for None, else the value (and unit) without trailing zeros."""
    return "-" if value is None else f"{value:g}{unit}"


def too_big(fits: Optional[bool]) -> str:
    """`` (too big)`` after a planned figure that does not fit its device, else nothing."""
    return " (too big)" if fits is False else ""


def render_text(table: List[Row]) -> str:
    """The table ``npu-recipes ls`` and ``make list`` print: one line per recipe, its description below it."""
    header = ("recipe", "model", "devices", "parallelism", "seed row", "seed GB/dev", "seed runtime",
              "planned GiB/dev", "full FT GiB/dev", "planned for")
    lines = [header] + [
        (r.name, r.model, str(r.devices), r.parallelism, format_cell(r.seed_row), format_cell(r.seed_memory_gb),
         format_cell(r.seed_runtime_hours, " h"), format_cell(r.planned_gib) + too_big(r.fits),
         format_cell(r.planned_full_gib) + too_big(r.full_fits), r.target or "-")
        for r in table
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(lines[0], widths)).rstrip()]
    for line, r in zip(lines[1:], table):
        text.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        text.append(f"    {r.description}" if r.description else "    (no description)")
    return "\n".join(text)


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m npu_recipes.plan.catalogue``: print the recipe table (``make list``)."""
    argparse.ArgumentParser(description="List the shipped recipes with the seed's and the planned memory.").parse_args(argv)
    print(render_text(rows()))
    print("\nrun one: npu-recipes +recipe=NAME [key=value ...] (or make NAME-WITH-DASHES ARGS=\"...\"); "
          "plan one: npu-recipes +recipe=NAME stage=plan")


if __name__ == "__main__":
    main()
