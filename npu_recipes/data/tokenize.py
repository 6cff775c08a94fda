"""Tokenizing a dataset for training: load, split, map to messages, tokenize with masks, filter by length.

Cached by HF datasets under a fingerprint of the rows, the tokenizer and the settings, so the
launching process tokenizes once and every worker reads the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Dict

from npu_recipes.config.schema import DatasetConfig
from npu_recipes.data.messages import IGNORE_INDEX, check_columns, to_messages, tokenize_conversation
from npu_recipes.data.sources import ROW_ID, load_rows, split_rows
from npu_recipes.errors import UserError

log = logging.getLogger(__name__)

_TOKENIZATION_VERSION = 1


@dataclass
class TokenizedSplits:
    """What the train stage needs: tokenized ``train``/``eval`` datasets and their bookkeeping.

    ``counts`` holds row counts (``rows``, ``held_out`` (before filtering), ``train``, ``validation``, ``dropped_too_long``,
    ``dropped_no_assistant_tokens``, ``truncated``, ``train_tokens``); ``fingerprint`` identifies the raw rows (HF datasets fingerprint).
    ``held_out_rows`` are the raw validation rows before tokenization and length filtering (None
    when nothing is held out), recorded for the infer stage (:mod:`npu_recipes.run.heldout`).
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


def load_checked(dataset: DatasetConfig):
    """The rows of ``dataset`` (:func:`npu_recipes.data.sources.load_rows`) after checking that they
    have the columns its mapping reads; needs no tokenizer, so bad files fail before a model loads.

    Raises:
        UserError: bad files, or a mapped column missing.
    """
    rows = load_rows(dataset)
    check_columns(dataset, rows.column_names)
    return rows


def prepare(dataset: DatasetConfig, tokenizer, max_length: int, truncation: str, seed: int, rows=None,
            announce: bool = True) -> TokenizedSplits:
    """Load (unless ``rows`` from :func:`load_checked` are given), split, map to messages and tokenize
    ``dataset`` for training.

    ``announce`` logs the row counts; the train stage tokenizes once to prepare and reads the cache
    again in each worker, and says it once.

    Tokenization is cached by HF datasets under a fingerprint of the rows, tokenizer, template and
    length settings, so a second run (or a second rank) reuses it. Rows longer than ``max_length``
    tokens are dropped (``truncation="drop"``) or cut (``"truncate"``); rows left with no assistant
    token are dropped either way; the counts are logged and returned.

    Raises:
        UserError: bad files, missing columns, bad rows, or no rows left after filtering.
    """
    rows = load_checked(dataset) if rows is None else rows
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
    (log.info if announce else log.debug)(
        "dataset %s: %d rows -> %d train, %d validation; dropped %d longer than max_length=%d and %d with no "
        "assistant tokens; %d truncated",
        dataset.name, counts["rows"], counts["train"], counts["validation"], counts["dropped_too_long"],
        max_length, counts["dropped_no_assistant_tokens"], counts["truncated"],
    )
    if counts["train"] == 0:
        _raise_nothing_left(dataset, len(train_rows), train_counts, counts["held_out"], max_length, truncation)
    if announce and val_rows is not None and counts["validation"] == 0:
        log.warning(
            "all %d held-out rows were dropped by the length filter (train.max_length=%d): training runs without evaluation",
            counts["held_out"], max_length,
        )
    return TokenizedSplits(train=train, eval=evaluation, counts=counts, fingerprint=rows._fingerprint, held_out_rows=val_rows)

