"""Datasets: load rows, turn them into chat messages, split, tokenize with assistant-only labels.

The pipeline is split into small steps so that inference can rebuild a training run's exact
validation rows (:func:`load_rows` + :func:`split_rows`) without tokenizing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from npu_recipes import atomic, demo_data
from npu_recipes.errors import UserError
from npu_recipes.schema import DatasetConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that transformers' cross-entropy ignores (``ignore_index`` of ``nn.CrossEntropyLoss``)."""

ROW_ID = "row_id"
"""Column added to every loaded dataset: the row's 0-based position in the source split."""

BUILDERS: Dict[str, Callable[[Path, int], None]] = {"demo_math": demo_data.write}
"""Local dataset builders: ``dataset.builder=NAME`` writes ``dataset.path`` (JSON lines) on first use."""

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_ROLES = ("system", "user", "assistant")
_TOKENIZATION_VERSION = 1


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


def _first_bad_json_line(path: Path) -> Optional[Tuple[int, str]]:
    """The first line of a JSON lines file that is not a JSON object, as (line number, problem)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                return number, f"invalid JSON ({error.msg} at column {error.colno})"
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
        return error.lineno, f"invalid JSON ({error.msg} at column {error.colno})"
    if not isinstance(document, list):
        return 1, f"expected an array of JSON objects, found {type(document).__name__}"
    for index, record in enumerate(document):
        if not isinstance(record, dict):
            return None, f"record {index + 1} of the array is a {type(record).__name__}, not a JSON object"
    return None


def _json_problem(path: Path) -> Optional[Tuple[Optional[int], str]]:
    """Where a JSON or JSON lines file is malformed, as (line number or None, problem), or None."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 12).lstrip()
    if path.suffix == ".json" and head.startswith(b"["):
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
    mapped = _mapped_columns(dataset)
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
    Returns ``(rows, None)`` when ``ratio == 0``.
    """
    if ratio <= 0:
        return rows, None
    held_out = max(1, int(round(len(rows) * ratio)))
    if held_out >= len(rows):
        raise UserError(
            f"dataset.val_split_ratio={ratio} holds out all {len(rows)} rows", fix="lower dataset.val_split_ratio"
        )
    parts = rows.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _template_columns(template: Optional[str]) -> List[str]:
    if not template:
        return []
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def check_columns(dataset: DatasetConfig, column_names: List[str]) -> None:
    """Fail early when the mapping names a column the data does not have.

    Raises:
        UserError: names the missing column, the config key that needs it, and the columns found.
    """
    if dataset.messages_column is not None:
        needed = {dataset.messages_column: "dataset.messages_column"}
    else:
        if not dataset.user_template or not dataset.assistant_template:
            raise UserError(
                f"dataset={dataset.name} maps no columns",
                fix="set dataset.messages_column, or dataset.user_template and dataset.assistant_template",
            )
        needed = {}
        for key in ("system_template", "user_template", "assistant_template"):
            for column in _template_columns(getattr(dataset, key)):
                needed.setdefault(column, f"dataset.{key}")
    found = [c for c in column_names if c != ROW_ID]
    for column, key in needed.items():
        if column not in column_names:
            raise UserError(
                f"dataset {dataset.path} has no column {column!r} (needed by {key}); columns found: {', '.join(found)}",
                fix=f"set {key} to use the columns above, or pick the dataset option that matches this file",
            )


def _where(dataset: DatasetConfig, row: Dict[str, Any]) -> str:
    return f"{dataset.path} row {row[ROW_ID]} (0-based; record {row[ROW_ID] + 1} of the file)"


def _field_text(row: Dict[str, Any], column: str, dataset: DatasetConfig) -> str:
    value = row.get(column)
    if value is None:
        problem = "missing (absent or null)"
    elif isinstance(value, str) and not value.strip():
        problem = "empty"
    elif isinstance(value, (bool, dict, list)):
        problem = f"a {type(value).__name__}, not text"
    else:
        return str(value)
    found = [c for c in row if c != ROW_ID and row[c] not in (None, "")]
    raise UserError(
        f"{_where(dataset, row)}: column {column!r} is {problem}; columns found in that row: {', '.join(found)}",
        fix="fix or remove that row, or map other columns with dataset.*_template",
    )


def to_messages(row: Dict[str, Any], dataset: DatasetConfig, require_assistant: bool = True) -> List[Dict[str, str]]:
    """Turn one raw row into OpenAI-style chat messages ``[{"role", "content"}, ...]``.

    ``require_assistant=False`` accepts a ``messages`` conversation without an assistant turn
    (a prompt to generate for, as the infer stage reads them).

    Raises:
        UserError: a mapped field is missing, empty or not text; a messages list is malformed
            (names the row and column).
    """
    where = _where(dataset, row)
    if dataset.messages_column is not None:
        messages = row.get(dataset.messages_column)
        if not isinstance(messages, list) or not messages:
            raise UserError(
                f"{where}: column {dataset.messages_column!r} must be a non-empty list of {{role, content}} objects",
                fix="fix or remove that row",
            )
        cleaned = []
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in _ROLES or not isinstance(message.get("content"), str):
                raise UserError(
                    f"{where}: message {turn} must have a role in {_ROLES} and string content, got {message!r}",
                    fix="fix or remove that row",
                )
            cleaned.append({"role": message["role"], "content": message["content"]})
        if require_assistant and not any(m["role"] == "assistant" for m in cleaned):
            raise UserError(f"{where}: the conversation has no assistant turn to learn from", fix="fix or remove that row")
        first_turn = next(m["role"] for m in cleaned if m["role"] != "system")
        if first_turn != "user":
            raise UserError(f"{where}: the conversation must open with a user turn (after an optional system turn)", fix="fix or remove that row")
        empty = [i for i, m in enumerate(cleaned) if m["role"] == "assistant" and not m["content"].strip()]
        if empty:
            raise UserError(f"{where}: assistant message {empty[0]} is empty", fix="fix or remove that row")
        return cleaned
    values = {column: _field_text(row, column, dataset) for column in _mapped_columns(dataset)}
    messages = []
    if dataset.system_template:
        messages.append({"role": "system", "content": dataset.system_template.format(**values)})
    messages.append({"role": "user", "content": dataset.user_template.format(**values)})
    messages.append({"role": "assistant", "content": dataset.assistant_template.format(**values)})
    return messages


def _mapped_columns(dataset: DatasetConfig) -> List[str]:
    if dataset.messages_column is not None:
        return [dataset.messages_column]
    columns: List[str] = []
    for template in (dataset.system_template, dataset.user_template, dataset.assistant_template):
        columns.extend(c for c in _template_columns(template) if c not in columns)
    return columns


def tokenize_conversation(messages: List[Dict[str, str]], tokenizer) -> Tuple[List[int], List[int]]:
    """Tokenize a conversation with the tokenizer's chat template; label only what the assistant says.

    Each assistant turn contributes the tokens the template adds after the generation prompt,
    up to and including its end-of-turn special token (``<|im_end|>`` for ChatML); every other
    token (system, user, role headers, the newline after ``<|im_end|>``) gets label -100.
    Messages after the last assistant turn are dropped.

    Returns:
        ``(input_ids, labels)``, two lists of equal length.

    Raises:
        UserError: the chat template is not prefix-stable (a longer conversation does not start
            with the rendering of its beginning), so turns cannot be told apart.
    """
    special_ids = set(tokenizer.all_special_ids)
    input_ids: List[int] = []
    labels: List[int] = []
    rendered = ""
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for index in range(last_assistant + 1):
        if messages[index]["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise UserError(
                "the tokenizer's chat template renders a conversation's beginning differently from the "
                "whole, so assistant turns cannot be located for label masking",
                fix="use a template whose renderings are prefixes of each other (ChatML, as Qwen2 uses)",
            )
        prompt_ids = tokenizer(prompt[len(rendered):], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        end = max((i for i, t in enumerate(answer_ids) if t in special_ids), default=len(answer_ids) - 1) + 1
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids[:end] + [IGNORE_INDEX] * (len(answer_ids) - end)
        rendered = full
    return input_ids, labels


@dataclass
class TokenizedSplits:
    """What the train stage needs: tokenized ``train``/``eval`` datasets and their bookkeeping.

    ``counts`` holds row counts (``rows``, ``held_out`` (before filtering), ``train``, ``validation``, ``dropped_too_long``,
    ``dropped_no_assistant_tokens``, ``truncated``, ``train_tokens``); ``fingerprint`` identifies the raw rows (HF datasets fingerprint).
    ``held_out_rows`` are the raw validation rows before tokenization and length filtering (None
    when nothing is held out), recorded for the infer stage (:mod:`npu_recipes.heldout`).
    """

    train: Any
    eval: Any
    counts: Dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""
    held_out_rows: Any = None


def _tokenizer_digest(tokenizer) -> str:
    digest = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update((tokenizer.chat_template or "").encode())
    return digest.hexdigest()[:16]


def _tokenize_split(rows, dataset: DatasetConfig, tokenizer, max_length: int, truncation: str):
    tokenizer_digest = _tokenizer_digest(tokenizer)

    def encode(row):
        input_ids, labels = tokenize_conversation(to_messages(row, dataset), tokenizer)
        too_long = len(input_ids) > max_length
        if too_long and truncation == "truncate":
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if too_long and truncation == "drop":
            reason = "too_long"
        elif all(label == IGNORE_INDEX for label in labels):
            reason = "no_assistant_tokens"
        else:
            reason = ""
        return {"input_ids": input_ids, "labels": labels, "drop_reason": reason, "truncated": too_long and not reason}

    settings = json.dumps(
        [rows._fingerprint, tokenizer_digest, max_length, truncation, _TOKENIZATION_VERSION,
         dataset.messages_column, dataset.system_template, dataset.user_template, dataset.assistant_template]
    )
    tokenized = rows.map(
        encode,
        remove_columns=[c for c in rows.column_names if c != ROW_ID],
        new_fingerprint=hashlib.sha256(settings.encode()).hexdigest()[:32],
        desc="tokenizing",
    )
    kept = tokenized.filter(lambda reason: not reason, input_columns="drop_reason", desc="length filter")
    reasons = tokenized["drop_reason"]
    counts = {
        "kept": len(kept),
        "too_long": reasons.count("too_long"),
        "no_assistant_tokens": reasons.count("no_assistant_tokens"),
        "truncated": sum(kept["truncated"]),
    }
    if not kept and counts["too_long"]:
        # Only for the error message of an emptied split: the length that would keep one row.
        counts["shortest_too_long"] = min(len(ids) for ids, reason in zip(tokenized["input_ids"], reasons) if reason == "too_long")
    return kept.remove_columns(["drop_reason", "truncated"]), counts


def _raise_nothing_left(dataset: DatasetConfig, rows: int, counts: Dict[str, int], held_out: int, max_length: int, truncation: str) -> None:
    """Refuse a training split the length filter emptied, with the count of rows dropped for each reason."""
    reasons = []
    if counts["too_long"]:
        reasons.append(
            f"{counts['too_long']} longer than train.max_length={max_length} tokens (shortest: {counts['shortest_too_long']} tokens)"
        )
    if counts["no_assistant_tokens"]:
        reasons.append(f"{counts['no_assistant_tokens']} with no assistant token left after truncation to train.max_length={max_length}")
    held = f"; {held_out} more held out for validation" if held_out else ""
    fix = "raise train.max_length"
    if counts["too_long"]:
        fix += f" (to at least {counts['shortest_too_long']} to keep a row)"
        if truncation == "drop":
            fix += ", or set train.truncation_strategy=truncate"
    raise UserError(f"dataset {dataset.path}: 0 of {rows} rows left for training: {', '.join(reasons)}{held}", fix=fix)


def prepare(dataset: DatasetConfig, tokenizer, max_length: int, truncation: str, seed: int) -> TokenizedSplits:
    """Load, split, map to messages and tokenize ``dataset`` for training.

    Tokenization is cached by HF datasets under a fingerprint of the rows, tokenizer, template and
    length settings, so a second run (or a second rank) reuses it. Rows longer than ``max_length``
    tokens are dropped (``truncation="drop"``) or cut (``"truncate"``); rows left with no assistant
    token are dropped either way; the counts are logged and returned.

    Raises:
        UserError: bad files, missing columns, bad rows, or no rows left after filtering.
    """
    rows = load_rows(dataset)
    check_columns(dataset, rows.column_names)
    train_rows, val_rows = split_rows(rows, dataset.val_split_ratio, seed)
    train, train_counts = _tokenize_split(train_rows, dataset, tokenizer, max_length, truncation)
    evaluation, val_counts = None, {"kept": 0, "too_long": 0, "no_assistant_tokens": 0, "truncated": 0}
    if val_rows is not None:
        evaluation, val_counts = _tokenize_split(val_rows, dataset, tokenizer, max_length, truncation)
        if len(evaluation) == 0:
            evaluation = None
    counts = {
        "rows": len(rows),
        "held_out": 0 if val_rows is None else len(val_rows),
        "train": train_counts["kept"],
        "validation": val_counts["kept"],
        "dropped_too_long": train_counts["too_long"] + val_counts["too_long"],
        "dropped_no_assistant_tokens": train_counts["no_assistant_tokens"] + val_counts["no_assistant_tokens"],
        "truncated": train_counts["truncated"] + val_counts["truncated"],
        "train_tokens": int(sum(len(ids) for ids in train["input_ids"])),
    }
    log.info(
        "dataset %s: %d rows -> %d train, %d validation; dropped %d longer than max_length=%d and %d with no "
        "assistant tokens; %d truncated",
        dataset.name, counts["rows"], counts["train"], counts["validation"], counts["dropped_too_long"],
        max_length, counts["dropped_no_assistant_tokens"], counts["truncated"],
    )
    if counts["train"] == 0:
        _raise_nothing_left(dataset, len(train_rows), train_counts, counts["held_out"], max_length, truncation)
    if val_rows is not None and counts["validation"] == 0:
        log.warning(
            "all %d held-out rows were dropped by the length filter (train.max_length=%d): training runs without evaluation",
            counts["held_out"], max_length,
        )
    return TokenizedSplits(train=train, eval=evaluation, counts=counts, fingerprint=rows._fingerprint, held_out_rows=val_rows)
