"""Rows as chat messages, and conversations as token ids with assistant-only labels.

A row becomes OpenAI-style messages through the dataset's column templates or its messages column
(:func:`to_messages`); a conversation becomes ``input_ids`` and ``labels`` through the tokenizer's
chat template, with every token that is not the assistant's own reply labelled
:data:`IGNORE_INDEX` (:func:`tokenize_conversation`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from npu_recipes.config.schema import DatasetConfig, template_columns
from npu_recipes.data.sources import ROW_ID
from npu_recipes.errors import UserError

IGNORE_INDEX = -100
"""Label value that transformers' cross-entropy ignores (``ignore_index`` of ``nn.CrossEntropyLoss``)."""

_ROLES = ("system", "user", "assistant")


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
            for column in template_columns(getattr(dataset, key)):
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
    values = {column: _field_text(row, column, dataset) for column in dataset.mapped_columns()}
    messages = []
    if dataset.system_template:
        messages.append({"role": "system", "content": dataset.system_template.format(**values)})
    messages.append({"role": "user", "content": dataset.user_template.format(**values)})
    messages.append({"role": "assistant", "content": dataset.assistant_template.format(**values)})
    return messages


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


