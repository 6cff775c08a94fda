"""Where training rows come from: local files (checked line by line), Hugging Face or ModelScope
hub ids, and local builders; loading them with HF ``datasets`` and splitting off validation rows.

Loading and splitting are separate from tokenizing (:mod:`npu_recipes.data.tokenize`) so that the
infer stage can rebuild a training run's exact validation rows without tokenizing anything.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from npu_recipes import atomic
from npu_recipes.config.schema import DatasetConfig
from npu_recipes.data import demo
from npu_recipes.errors import UserError

log = logging.getLogger(__name__)

ROW_ID = "row_id"
"""Column added to every loaded dataset: the row's 0-based position in the source split."""

BUILDERS: Dict[str, Callable[[Path, int], None]] = {"demo_math": demo.write}
"""Local dataset builders: ``dataset.builder=NAME`` writes ``dataset.path`` (JSON lines) on first use."""

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def resolve_path(dataset: DatasetConfig) -> str:
    """Return the absolute local path (building it when ``builder`` is set) or the hub id.

    Raises:
        UserError: no dataset selected (``dataset=none``); unknown builder; ``hub: local`` and the
            path does not exist.
    """
    if dataset.path is None:
        raise UserError(
            f"dataset={dataset.name} selects no data, and this stage needs some",
            fix="choose a dataset, e.g. dataset=gsm8k dataset.path=FILE or dataset=local dataset.path=FILE",
        )
    if dataset.builder is not None:
        if dataset.builder not in BUILDERS:
            raise UserError(
                f"dataset.builder={dataset.builder!r} is not a known builder",
                fix=f"use one of {sorted(BUILDERS)} or unset dataset.builder",
            )
        target = Path(dataset.path).expanduser().absolute()
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_with(target, lambda tmp: BUILDERS[dataset.builder](tmp, dataset.num_rows or 3000))
        return str(target)
    local = Path(dataset.path).expanduser()
    if local.exists():
        return os.path.abspath(local)
    looks_local = local.suffix in _LOCAL_FORMATS or dataset.path.startswith(("/", "./", "../", "~"))
    if dataset.hub == "local" or looks_local:
        raise UserError(
            f"dataset file {dataset.path!r} (dataset.path, dataset={dataset.name}) does not exist",
            fix="pass dataset.path=FILE with an existing .jsonl/.json/.csv/.parquet file or directory, "
            "or dataset.hub=huggingface/modelscope for a hub id",
        )
    return dataset.path


def _json_error(error: json.JSONDecodeError) -> str:
    """``error``'s reason and column; some reasons end in "at" already ("Unterminated string starting at")."""
    reason = error.msg[:-len(" at")] if error.msg.endswith(" at") else error.msg
    return f"{reason} at column {error.colno}"


def _file_columns(path: Path, builder: str) -> List[str]:
    """The columns of one local data file as HF datasets' builder reads them: the keys of every JSON
    record, a CSV file's header, a Parquet file's schema."""
    if builder == "parquet":
        import pyarrow.parquet

        return list(pyarrow.parquet.read_schema(path).names)
    if builder == "csv":
        import csv

        with open(path, encoding="utf-8", newline="") as handle:
            return next(csv.reader(handle), [])
    text = path.read_text(encoding="utf-8")
    records = json.loads(text) if path.suffix == ".json" and text.lstrip().startswith("[") else [
        json.loads(line) for line in text.splitlines() if line.strip()]
    return list(dict.fromkeys(key for record in records if isinstance(record, dict) for key in record))


def local_columns(dataset: DatasetConfig) -> Optional[List[str]]:
    """The columns of a resolved local ``dataset.path`` (its first data file for a directory), from its
    first JSON record, CSV header or Parquet schema; None for hub data or a file that does not read
    (:func:`load_rows` then says what is wrong with it)."""
    path = Path(dataset.path or "")
    if dataset.path is None or not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _LOCAL_FORMATS)
    builder = _LOCAL_FORMATS.get(files[0].suffix) if files else None
    if builder is None:
        return None
    try:
        if builder != "json" or (files[0].suffix == ".json" and _starts_with(files[0], b"[")):
            return _file_columns(files[0], builder)
        with open(files[0], encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "{}")
        record = json.loads(first)
        return list(record) if isinstance(record, dict) else None
    except (OSError, ValueError, StopIteration):
        return None


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(1 << 12).lstrip().startswith(prefix)


def _check_same_columns(files: List[Path], builder: str, directory: Path) -> None:
    """Refuse a dataset directory whose files have different columns, naming the first that differs
    (HF datasets casts every file to the first one's columns and reports only that generation failed)."""
    first = _file_columns(files[0], builder)
    for other in files[1:]:
        columns = _file_columns(other, builder)
        if set(columns) != set(first):
            raise UserError(
                f"dataset directory {directory}: its files have different columns: {files[0].name} has "
                f"{', '.join(first)}; {other.name} has {', '.join(columns)}",
                fix="give every file of the directory the same columns, or point dataset.path at one file",
            )


def _first_bad_json_line(path: Path) -> Optional[Tuple[int, str]]:
    """The first line of a JSON lines file that is not a JSON object, as (line number, problem)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                return number, f"invalid JSON ({_json_error(error)})"
            if not isinstance(record, dict):
                return number, f"expected a JSON object, found {type(record).__name__}"
    return None


def _json_document_problem(path: Path) -> Optional[Tuple[Optional[int], str]]:
    """For a ``.json`` file holding one document (an array of objects, HF datasets' other JSON form):
    the problem with it, as (line number or None, problem); None when it is such a document."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        return error.lineno, f"invalid JSON ({_json_error(error)})"
    if not isinstance(document, list):
        return 1, f"expected an array of JSON objects, found {type(document).__name__}"
    for index, record in enumerate(document):
        if not isinstance(record, dict):
            return None, f"record {index + 1} of the array is a {type(record).__name__}, not a JSON object"
    return None


def _json_problem(path: Path) -> Optional[Tuple[Optional[int], str]]:
    """Where a JSON or JSON lines file is malformed, as (line number or None, problem), or None."""
    if path.suffix == ".json" and _starts_with(path, b"["):
        return _json_document_problem(path)
    return _first_bad_json_line(path)


_UTF8_CHUNK = 1 << 20


def _check_utf8(path: Path) -> None:
    """Refuse a text data file that is not valid UTF-8, naming the line of the first bad byte.

    pyarrow's JSON and CSV readers accept such bytes and fail only when a row is read, deep inside
    tokenization; one streaming pass over the file (1 MiB at a time) finds them up front.
    """
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed, newlines, line_start = 0, 0, 0
    with open(path, "rb") as handle:
        while True:
            pending = decoder.getstate()[0]
            chunk = handle.read(_UTF8_CHUNK)
            data, base = pending + chunk, consumed - len(pending)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                before = data[: error.start]
                line = newlines + before.count(b"\n") + 1
                if b"\n" in before:
                    line_start = base + before.rindex(b"\n") + 1
                raise UserError(
                    f"{path} line {line}: not valid UTF-8 "
                    f"(byte 0x{data[error.start]:02x} at byte {base + error.start - line_start + 1} of the line)",
                    fix="save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8)",
                ) from None
            if not chunk:
                return
            newlines += chunk.count(b"\n")
            if b"\n" in chunk:
                line_start = consumed + chunk.rindex(b"\n") + 1
            consumed += len(chunk)


def _load_local(path: Path, split: str):
    from datasets import load_dataset

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in _LOCAL_FORMATS)
    if not files:
        raise UserError(
            f"dataset directory {path} holds no .jsonl/.json/.csv/.parquet file", fix="point dataset.path at a data file"
        )
    suffixes = sorted({f.suffix for f in files})
    if len({_LOCAL_FORMATS.get(suffix) for suffix in suffixes}) > 1:
        raise UserError(
            f"dataset directory {path} mixes formats ({', '.join(suffixes)})",
            fix="keep one format per directory, or point dataset.path at one file",
        )
    if suffixes[0] not in _LOCAL_FORMATS:
        raise UserError(
            f"dataset file {path} has an unsupported extension {suffixes[0]!r}",
            fix=f"use one of {', '.join(_LOCAL_FORMATS)}",
        )
    builder = _LOCAL_FORMATS[suffixes[0]]
    for candidate in files:
        try:
            with open(candidate, "rb") as handle:
                has_content = bool(handle.read(1 << 16).strip())
        except OSError as error:
            raise UserError(f"cannot read dataset file {candidate}: {error.strerror}", fix="check the path and its permissions") from None
        if not has_content:
            raise UserError(f"dataset file {candidate} is empty (no rows)", fix="point dataset.path at a file with rows")
        if builder in ("json", "csv"):
            _check_utf8(candidate)
    split_name = split.partition("[")[0]
    try:
        return load_dataset(builder, data_files={split_name: [str(f) for f in files]}, split=split)
    except Exception as error:
        if builder == "json":
            for candidate in files:
                bad = _json_problem(candidate)
                if bad is not None:
                    line, problem = bad
                    raise UserError(
                        f"{candidate}{'' if line is None else f' line {line}'}: {problem}",
                        fix="fix or delete that line of the dataset file" if line else "fix that record of the dataset file",
                    ) from None
        if len(files) > 1:
            _check_same_columns(files, builder, path)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not read dataset {path}: {reason}", fix=f"check that it is valid {builder}, UTF-8 encoded") from None


def _leaf_types(value: Any) -> frozenset:
    if isinstance(value, dict):
        return frozenset().union(*(_leaf_types(v) for v in value.values())) if value else frozenset()
    if isinstance(value, list):
        return frozenset().union(*(_leaf_types(v) for v in value)) if value else frozenset()
    return frozenset({type(value).__name__})


def _contains_json_feature(feature: Any) -> bool:
    if type(feature).__name__ == "Json":
        return True
    if isinstance(feature, dict):
        return any(_contains_json_feature(v) for v in feature.values())
    inner = getattr(feature, "feature", None)
    return inner is not None and _contains_json_feature(inner)


def _check_consistent_types(dataset: DatasetConfig, rows, path: Path) -> None:
    """HF datasets types a JSON column holding both text and numbers as ``Json`` and silently turns
    ``"007"`` into ``7``; refuse such a column and name the first line that differs."""
    mapped = dataset.mapped_columns()
    mixed = [c for c in mapped if c in rows.features and _contains_json_feature(rows.features[c])]
    if not mixed or not path.is_file():
        return
    column = mixed[0]
    first = None
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            types = _leaf_types(json.loads(line).get(column))
            if first is None:
                first = (number, types)
            elif types != first[1]:
                raise UserError(
                    f"{path} line {number}: column {column!r} holds {'/'.join(sorted(types))} where line {first[0]} "
                    f"holds {'/'.join(sorted(first[1]))}; mixed JSON types would be silently converted",
                    fix=f"make every value of {column!r} the same JSON type (quote numbers as strings)",
                )


def load_rows(dataset: DatasetConfig):
    """Load the raw rows of ``dataset`` (the first ``max_samples`` if set) as an HF ``datasets.Dataset``
    with an added ``row_id`` column.

    ``dataset.path`` must already be resolved (:func:`resolve_path`). Local files are read with
    HF datasets' json/csv/parquet builders (cached by content fingerprint); hub ids through
    ``datasets.load_dataset`` or, for ``hub: modelscope``, ModelScope's snapshot download.

    Raises:
        UserError: unreadable or malformed file (JSON lines: names the file and line), hub failure.
    """
    from datasets import load_dataset

    local = Path(dataset.path)
    if local.exists():
        rows = _load_local(local, dataset.split)
        _check_consistent_types(dataset, rows, local)
    elif dataset.hub == "modelscope":
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise UserError(
                f"dataset {dataset.path!r} is on ModelScope (dataset.hub=modelscope) but the modelscope package is missing",
                fix="pip install modelscope, or download the data and pass dataset.path=FILE",
            ) from None
        try:
            directory = snapshot_download(dataset.path, repo_type="dataset")
            rows = load_dataset(directory, name=dataset.subset, split=dataset.split)
        except Exception as error:
            raise UserError(
                f"could not load {dataset.path!r} from ModelScope: {error}",
                fix="check the id and your network, or download the data and pass dataset.path=FILE",
            ) from None
    else:
        try:
            rows = load_dataset(dataset.path, name=dataset.subset, split=dataset.split)
        except Exception as error:
            raise UserError(
                f"could not load dataset {dataset.path!r} from the Hugging Face hub: {error}",
                fix="check the id and network, or pass a local file with dataset.path=FILE",
            ) from None
    if dataset.max_samples is not None:
        rows = rows.select(range(min(dataset.max_samples, len(rows))))
    if ROW_ID in rows.column_names:
        rows = rows.remove_columns(ROW_ID)
    return rows.add_column(ROW_ID, list(range(len(rows))))


def split_rows(rows, ratio: float, seed: int):
    """Split ``rows`` into (train, validation) with ``ratio`` of the rows held out.

    At least one row is held out when ``ratio > 0``; the split is a seeded shuffle
    (``Dataset.train_test_split``), so the same rows, ratio and seed always give the same split.
    Returns ``(rows, None)`` when ``ratio == 0``, or when there is a single row (the default ratio,
    swift's 0.01, must not make a one-row file unusable; a warning says nothing was held out).

    Raises:
        UserError: ``ratio`` holds out every row of two or more.
    """
    if ratio <= 0:
        return rows, None
    if len(rows) == 1:
        log.warning("the dataset has a single row: nothing is held out for validation (dataset.val_split_ratio=%g)", ratio)
        return rows, None
    held_out = max(1, int(round(len(rows) * ratio)))
    if held_out >= len(rows):
        raise UserError(
            f"dataset.val_split_ratio={ratio} holds out all {len(rows)} rows", fix="lower dataset.val_split_ratio"
        )
    parts = rows.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
