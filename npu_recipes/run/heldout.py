"""The validation rows a training run held out: recorded by the train stage, rebuilt by the infer stage.

Training writes ``validation_rows.json`` into its run directory: the held-out rows' ``row_id``
values (0-based positions in the source split, see :data:`npu_recipes.data.sources.ROW_ID`) and a SHA-256
of their contents. ``infer load_data_args=true`` rebuilds the split from the run's
``resolved.yaml`` (same rows, ``dataset.val_split_ratio`` and ``train.seed``) and refuses to
evaluate when either differs, so an edited data file or a changed split can never be mistaken
for the run's validation set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Tuple

from npu_recipes import atomic
from npu_recipes.config.resolved import RESOLVED, load_resolved
from npu_recipes.config.schema import DatasetConfig
from npu_recipes.data import sources
from npu_recipes.errors import UserError

log = logging.getLogger(__name__)

VALIDATION_ROWS = "validation_rows.json"


def describe(rows) -> Dict[str, Any]:
    """``{"count", "row_ids", "sha256"}`` of a held-out ``datasets.Dataset`` (rows in split order).

    ``sha256`` hashes every row as JSON with sorted keys, one per line, so any change to a held-out
    row's text changes it.
    """
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    row_ids = [int(i) for i in rows[sources.ROW_ID]]
    return {"count": len(row_ids), "row_ids": row_ids, "sha256": digest.hexdigest()}


def write(run_path: Path, rows) -> None:
    """Record the held-out ``rows`` in ``run_path/validation_rows.json`` (atomically)."""
    atomic.write_json(Path(run_path) / VALIDATION_ROWS, describe(rows))


def rebuild(run_path: Path) -> Tuple[DatasetConfig, Any]:
    """Rebuild the validation rows of the training run in ``run_path`` from its resolved.yaml.

    Returns:
        ``(dataset_config, rows)``: the run's dataset settings and its held-out rows as a
        ``datasets.Dataset`` with the ``row_id`` column, in the order training held them out.

    Raises:
        UserError: the run held out nothing; the rebuilt row ids or contents differ from what the
            run recorded (names both counts and the first differing id).
    """
    run_path = Path(run_path)
    run_config = load_resolved(run_path / RESOLVED)
    dataset = run_config.dataset
    no_rows = UserError(
        f"load_data_args=true: the training run {run_path} held out no validation rows "
        f"(dataset.val_split_ratio={dataset.val_split_ratio:g}{'' if dataset.val_split_ratio <= 0 else ' of a single row'})",
        fix="evaluate on other data with dataset=NAME dataset.path=FILE instead of load_data_args=true",
    )
    if dataset.val_split_ratio <= 0:
        raise no_rows
    dataset = dataclasses.replace(dataset, path=sources.resolve_path(dataset))
    rows = sources.load_rows(dataset)
    _, held_out = sources.split_rows(rows, dataset.val_split_ratio, run_config.train.seed)
    if held_out is None:
        raise no_rows
    recorded_path = run_path / VALIDATION_ROWS
    if not recorded_path.is_file():
        log.warning("%s has no %s (a run from before it was recorded): the rebuilt %d validation rows cannot be "
                    "checked against what training held out", run_path, VALIDATION_ROWS, len(held_out))
        return dataset, held_out
    recorded = json.loads(recorded_path.read_text())
    rebuilt = describe(held_out)
    if rebuilt["row_ids"] != recorded["row_ids"]:
        first = next((f"position {i}: rebuilt row {a}, recorded row {b}"
                      for i, (a, b) in enumerate(zip(rebuilt["row_ids"], recorded["row_ids"])) if a != b),
                     "the shorter list is a prefix of the longer")
        raise UserError(
            f"load_data_args=true: the validation split rebuilt from {run_path / RESOLVED} "
            f"({rebuilt['count']} rows) differs from the {recorded['count']} rows training held out "
            f"({recorded_path.name}); first difference at {first}",
            fix=f"restore the training data at {dataset.path} and the run's resolved.yaml, or evaluate with dataset=NAME",
        )
    if rebuilt["sha256"] != recorded["sha256"]:
        raise UserError(
            f"load_data_args=true: the {rebuilt['count']} validation rows of {dataset.path} have the ids training held "
            f"out but different contents (SHA-256 {rebuilt['sha256'][:12]} now, {recorded['sha256'][:12]} at training)",
            fix=f"restore the data file the run trained on ({dataset.path}), or evaluate with dataset=NAME",
        )
    return dataset, held_out
