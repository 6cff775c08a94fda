"""Rows as chat messages, and conversations as token ids with assistant-only labels.

A row becomes OpenAI-style messages through the dataset's column templates or its messages column
(:func:`to_messages`); a conversation becomes ``input_ids`` and ``labels`` through the tokenizer's
chat template, with every token that is not the assistant's own reply labelled
:data:`IGNORE_INDEX` (:func:`tokenize_conversation`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Tuple

from npu_recipes.config.schema import DatasetConfig, template_columns
from npu_recipes.data.sources import ROW_ID
from npu_recipes.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that transformers' cross-entropy ignores (``ignore_index`` of ``nn.CrossEntropyLoss``)."""

_ROLES = ("system", "user", "assistant")


KNOWN_LAYOUTS: Tuple[Tuple[str, str, str], ...] = (
    ("question", "{question}", "{answer}"),
    ("query", "{query}", "{response}"),
    ("instruction", "{instruction}\n\n{input}", "{output}"),
    ("instruction", "{instruction}", "{output}"),
    ("prompt", "{prompt}", "{completion}"),
    ("prompt", "{prompt}", "{response}"),
)
"""Column layouts a local file without a messages column is read in when no template is set, first
match wins: (name, user template, assistant template). The pairs ms-swift's preprocessors map to its
query/response (``swift/llm/dataset/preprocessor``); ``input`` joins ``instruction`` when present."""


def known_layout(dataset: DatasetConfig, column_names: Optional[List[str]]) -> DatasetConfig:
    """``dataset`` mapped to the first of :data:`KNOWN_LAYOUTS` whose columns ``column_names`` has,
    when it reads a ``messages_column`` the data lacks and sets no template; else ``dataset`` unchanged.

    ``column_names`` are a local file's columns (None for hub data, which is left as configured).
    The mapping becomes the dataset's templates, so it is logged, recorded in ``resolved.yaml`` and
    part of the tokenization cache's key like any template.
    """
    templates = (dataset.system_template, dataset.user_template, dataset.assistant_template)
    if column_names is None or dataset.messages_column is None or dataset.messages_column in column_names or any(templates):
        return dataset
    for _, user, assistant in KNOWN_LAYOUTS:
        if all(column in column_names for column in template_columns(user) + template_columns(assistant)):
            log.info("dataset %s has no column %r; mapping its columns as dataset.user_template=%r dataset.assistant_template=%r",
                     dataset.path, dataset.messages_column, user, assistant)
            return dataclasses.replace(dataset, messages_column=None, user_template=user, assistant_template=assistant)
    return dataset


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
            fix = f"set {key} to use the columns above, or pick the dataset option that matches this file"
            if key == "dataset.messages_column" and len(found) >= 2:
                # A messages column cannot be any of these; templates over two of them can.
                fix = (f"map two of the columns above to the user and assistant turns: dataset.messages_column=null "
                       f"dataset.user_template='{{{found[0]}}}' dataset.assistant_template='{{{found[1]}}}' "
                       f"(put these overrides on the python -m npu_recipes line npu-recipes sft prints)")
            raise UserError(
                f"dataset {dataset.path} has no column {column!r} (needed by {key}); columns found: {', '.join(found)}",
                fix=fix,
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


def _common_prefix_length(a: str, b: str) -> int:
    length = min(len(a), len(b))
    for index in range(length):
        if a[index] != b[index]:
            return index
    return length


def tokenize_conversation(messages: List[Dict[str, str]], tokenizer) -> Tuple[List[int], List[int]]:
    """Tokenize a conversation with the tokenizer's chat template; label only what the assistant says.

    The conversation (up to its last assistant turn; later messages are dropped) is rendered once,
    and that rendering is what trains. Each assistant turn starts where the rendering leaves the
    turn's generation prompt (``add_generation_prompt=True`` over the messages before it) and is
    labelled up to and including the first special token after it: its end-of-turn token
    (``<|im_end|>`` in ChatML and Qwen3, ``<|eot_id|>`` in Llama 3, ``<｜end▁of▁sentence｜>`` in
    DeepSeek-R1) or, for templates without one (GLM-4), the next turn's opening token, which
    generation stops on; a last turn with neither gets the tokenizer's EOS appended and labelled.
    Everything else (system, user, role headers, the newline after ``<|im_end|>``) gets label -100.

    What the rendering puts inside a turn is labelled with it: Qwen3's ``<think>\n\n</think>\n\n``
    before the last answer. What a generation prompt adds that the rendering of history lacks
    (DeepSeek-R1's ``<think>\n``) is not part of the training text, and text a template drops
    from history (reasoning before ``</think>``) is not trained on.

    Returns:
        ``(input_ids, labels)``, two lists of equal length.

    Raises:
        UserError: the template renders the messages before an assistant turn differently inside
            the whole conversation, or puts no special token between turns, so assistant turns
            cannot be located.
    """
    special_ids = set(tokenizer.all_special_ids)
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last_assistant + 1]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    starts = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        history = tokenizer.apply_chat_template(messages[:index], tokenize=False) if index else ""
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        start = _common_prefix_length(prompt, rendered)
        if not rendered.startswith(history) or (starts and start <= starts[-1]):
            raise UserError(
                "the tokenizer's chat template renders the messages before an assistant turn differently inside the "
                "whole conversation, so assistant turns cannot be located for label masking",
                fix="use a template whose renderings of a conversation's beginning are prefixes of the whole (ChatML, as Qwen2 uses)",
            )
        starts.append(start)

    def ids(text: str) -> List[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    input_ids = ids(rendered[: starts[0]])
    labels = [IGNORE_INDEX] * len(input_ids)
    for number, start in enumerate(starts):
        final = number == len(starts) - 1
        turn = ids(rendered[start: len(rendered) if final else starts[number + 1]])
        end = next((i + 1 for i, token in enumerate(turn) if token in special_ids), None)
        if end is None and not final:
            raise UserError(
                "the tokenizer's chat template puts no special token between an assistant turn and the next message, "
                "so the end of the turn cannot be located for label masking",
                fix="use a template that ends or separates turns with special tokens (ChatML, Llama 3, GLM-4 do)",
            )
        if end is None:
            turn, end = turn + [tokenizer.eos_token_id], len(turn) + 1
        input_ids += turn
        labels += turn[:end] + [IGNORE_INDEX] * (len(turn) - end)
    return input_ids, labels
