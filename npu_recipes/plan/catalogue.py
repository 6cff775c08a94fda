"""The recipe catalogue: one row per shipped recipe with the seed's figures and the planned memory.

``make list`` prints it (``python -m npu_recipes.plan.catalogue``) and docs/recipes.md is generated from
it (:mod:`npu_recipes.plan.recipes_page`). Planned memory comes from the planner (:mod:`npu_recipes.plan.planner`)
with each recipe's own settings, for the device its ``plan.target`` resolves to; the models'
config.json are the copies shipped in ``npu_recipes/model/configs/`` (nothing is downloaded), or the
model's local directory (the demo's tiny model is built locally).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

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


def _planned(overrides: List[str], model_dir: Optional[str]) -> Optional[planner.Plan]:
    if model_dir is None:
        return None
    config = compose.compose(overrides)
    return planner.make(model=config.model, train_type=config.train_type, lora=config.lora, train=config.train,
                        parallelism=config.parallelism, device=config.device, options=config.plan, model_dir=model_dir)


def row(name: str) -> Row:
    """The :class:`Row` of recipe ``name`` (its planned memory for ``train_type`` lora as shipped and full)."""
    config = compose.compose([f"+recipe={name}"])
    shipped = pretrained.shipped_config_dir(config.model.name_or_path)
    local = config.model.builder is not None or Path(config.model.name_or_path).expanduser().is_dir()
    model_dir = str(shipped) if shipped else (pretrained.fetch_config(config.model) if local else None)
    shipped_plan = _planned([f"+recipe={name}"], model_dir)
    full_plan = _planned([f"+recipe={name}", "train_type=full"], model_dir)
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
        planned_gib=None if shipped_plan is None else round(shipped_plan.estimate.total_gib, 1),
        planned_full_gib=None if full_plan is None else round(full_plan.estimate.total_gib, 1),
        target=shipped_plan.target.label if shipped_plan else "",
        fits=None if shipped_plan is None else shipped_plan.fits,
        full_fits=None if full_plan is None else full_plan.fits,
        description=config.description,
    )


def rows() -> List[Row]:
    """Every shipped recipe: the seed table's rows in its order, then the others by name."""
    found = [row(name) for name in compose.recipe_names()]
    return sorted(found, key=lambda r: (r.seed_row is None, r.seed_row or 0, r.name))


def format_cell(value, unit: str = "") -> str:
    """A table cell: ``-`` for None, else the value (and unit) without trailing zeros."""
    return "-" if value is None else f"{value:g}{unit}"


def too_big(fits: Optional[bool]) -> str:
    """`` (too big)`` after a planned figure that does not fit its device, else nothing."""
    return " (too big)" if fits is False else ""


def render_text(table: List[Row]) -> str:
    """The table ``make list`` prints."""
    header = ("recipe", "make target", "model", "devices", "parallelism", "seed GB/dev", "seed runtime",
              "planned GiB/dev", "full FT GiB/dev", "device")
    lines = [header] + [
        (r.name, r.make_target, r.model, str(r.devices), r.parallelism, format_cell(r.seed_memory_gb), format_cell(r.seed_runtime_hours, " h"),
         format_cell(r.planned_gib) + too_big(r.fits), format_cell(r.planned_full_gib) + too_big(r.full_fits), r.target)
        for r in table
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m npu_recipes.plan.catalogue``: print the recipe table (``make list``)."""
    argparse.ArgumentParser(description="List the shipped recipes with the seed's and the planned memory.").parse_args(argv)
    print(render_text(rows()))
    print("\nrun one: make <make target> ARGS=\"key=value ...\"; plan one: python -m npu_recipes +recipe=<recipe> stage=plan")


if __name__ == "__main__":
    main()
