"""Data pipeline: chat-template tokenization with assistant-only labels, mapping, splitting, bad rows."""

from __future__ import annotations

import json
import logging
import re

import pytest

from npu_recipes.config.schema import DatasetConfig
from npu_recipes.data import demo, messages, sources, tokenize
from npu_recipes.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5"},
    {"role": "user", "content": "And 10 + 4?"},
    {"role": "assistant", "content": "10 + 4 = 14"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def test_exactly_the_assistant_tokens_carry_labels(tokenizer):
    input_ids, labels = messages.tokenize_conversation(CONVERSATION, tokenizer)
    assert len(input_ids) == len(labels)
    full_text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(input_ids) == full_text
    labelled = [i for i, label in enumerate(labels) if label != messages.IGNORE_INDEX]
    assert all(labels[i] == input_ids[i] for i in labelled)
    # The labelled positions form exactly two runs: each assistant reply plus its <|im_end|>.
    runs, start = [], labelled[0]
    for previous, current in zip(labelled, labelled[1:] + [None]):
        if current != previous + 1:
            runs.append(tokenizer.decode(input_ids[start : previous + 1]))
            start = current
    assert runs == ["2 + 3 = 5<|im_end|>", "10 + 4 = 14<|im_end|>"]
    # Nothing of the system prompt, user turns, role headers or trailing newlines is labelled.
    unlabelled_text = tokenizer.decode([t for t, label in zip(input_ids, labels) if label == messages.IGNORE_INDEX])
    assert "You add numbers." in unlabelled_text and "What is 2 + 3?" in unlabelled_text
    assert "2 + 3 = 5" not in unlabelled_text


def test_messages_after_the_last_assistant_turn_are_dropped(tokenizer):
    ids_full, _ = messages.tokenize_conversation(CONVERSATION, tokenizer)
    ids_extra, _ = messages.tokenize_conversation(CONVERSATION + [{"role": "user", "content": "thanks"}], tokenizer)
    assert ids_full == ids_extra


def test_demo_math_answers_are_correct():
    rows = demo.generate(500, seed=3)
    assert rows == demo.generate(500, seed=3)
    for row in rows:
        final_expression = re.findall(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)", row["output"])[-1]
        a, op, b, result = final_expression
        assert eval(f"{a} {op} {b}") == int(result) == int(row["answer"])


def _blossom_config(path) -> DatasetConfig:
    return DatasetConfig(name="t", path=str(path), user_template="{input}", assistant_template="{output}\n\nAnswer: {answer}",
                         val_split_ratio=0.0)


def test_blossom_mapping(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"input": "1+1?", "output": "1 + 1 = 2", "answer": "2"}) + "\n")
    rows = sources.load_rows(_blossom_config(path))
    assert messages.to_messages(rows[0], _blossom_config(path)) == [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "1 + 1 = 2\n\nAnswer: 2"},
    ]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps({"input": "q", "output": "o", "answer": "1"})
    path.write_text("\n".join([good, good, '{"input": "q", "output": ', good]) + "\n")
    with pytest.raises(UserError, match=r"broken\.jsonl line 3: invalid JSON"):
        sources.load_rows(_blossom_config(path))


def test_missing_column_in_a_row_names_row_and_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"input": "q", "output": "o", "answer": "1"}, {"input": "q2", "output": "o2"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = _blossom_config(path)
    loaded = sources.load_rows(config)
    messages.check_columns(config, loaded.column_names)
    with pytest.raises(UserError, match=r"row 1 \(0-based; record 2 of the file\): column 'answer' is missing \(absent or null\); columns found in that row: input, output"):
        messages.to_messages(loaded[1], config)


def test_column_absent_from_the_file_lists_the_columns_found(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(UserError, match=r"no column 'input' \(needed by dataset.user_template\); columns found: question, answer"):
        messages.check_columns(_blossom_config(path), sources.load_rows(_blossom_config(path)).column_names)


@pytest.mark.parametrize("row,user,assistant", [
    ({"question": "1+1?", "answer": "2", "id": 7}, "1+1?", "2"),
    ({"query": "q", "response": "r"}, "q", "r"),
    ({"instruction": "Add.", "input": "1+1", "output": "2"}, "Add.\n\n1+1", "2"),
    ({"instruction": "Add 1 and 1.", "output": "2"}, "Add 1 and 1.", "2"),
    ({"prompt": "p", "completion": "c"}, "p", "c"),
    ({"prompt": "p", "response": "r"}, "p", "r"),
])
def test_a_local_file_without_messages_is_read_in_a_known_column_layout(row, user, assistant, tmp_path, caplog):
    """dataset=local (messages_column: messages) on a file of question/answer-like columns: mapped as
    ms-swift maps them, logged, and kept in the templates (resolved.yaml, the tokenization key)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    config = DatasetConfig(name="local", path=str(path), messages_column="messages", val_split_ratio=0.0)
    caplog.set_level(logging.INFO, logger=messages.__name__)
    mapped = messages.known_layout(config, sources.local_columns(config))
    assert mapped.messages_column is None and "mapping its columns as dataset.user_template=" in caplog.text
    loaded = tokenize.load_checked(mapped)
    assert messages.to_messages(loaded[0], mapped) == [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_known_column_layouts_leave_configured_and_hub_data_alone(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("question,answer\n1+1?,2\n")
    config = DatasetConfig(name="local", path=str(path), messages_column="messages")
    assert sources.local_columns(config) == ["question", "answer"]
    assert messages.known_layout(config, sources.local_columns(config)).user_template == "{question}"
    assert messages.known_layout(config, None) is config, "hub data (no local columns) stays as configured"
    templated = DatasetConfig(name="t", path=str(path), user_template="{answer}", assistant_template="{question}")
    assert messages.known_layout(templated, ["question", "answer"]) is templated
    assert messages.known_layout(config, ["messages", "question", "answer"]) is config
    unknown = DatasetConfig(name="local", path=str(path), messages_column="messages")
    with pytest.raises(UserError) as caught:
        messages.check_columns(messages.known_layout(unknown, ["a", "b"]), ["a", "b", sources.ROW_ID])
    assert caught.value.fix.startswith("map two of the columns above to the user and assistant turns: dataset.messages_column=null "
                                       "dataset.user_template='{a}' dataset.assistant_template='{b}'")


def test_messages_rows_with_a_system_turn(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": CONVERSATION[1:3]}) + "\n")
    config = DatasetConfig(name="chat", path=str(path), messages_column="messages", val_split_ratio=0.0)
    splits = tokenize.prepare(config, tokenizer, max_length=512, truncation="drop", seed=0)
    assert splits.counts["train"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="message 0 must have a role in"):
        tokenize.prepare(DatasetConfig(name="bad", path=str(bad), messages_column="messages"), tokenizer, 512, "drop", 0)


def test_long_rows_are_dropped_or_truncated_and_counted(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    rows = [{"input": "short", "output": "ok", "answer": "1"}, {"input": "long " * 200, "output": "ok", "answer": "2"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dropped = tokenize.prepare(_blossom_config(path), tokenizer, max_length=64, truncation="drop", seed=0)
    assert (dropped.counts["train"], dropped.counts["dropped_too_long"]) == (1, 1)
    with pytest.raises(UserError, match=r"0 of 2 rows left for training: 2 longer than train.max_length=16 tokens \(shortest: \d+ tokens\)"):
        tokenize.prepare(_blossom_config(path), tokenizer, max_length=16, truncation="drop", seed=0)


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"input": str(i), "output": "o", "answer": "1"}) + "\n" for i in range(300)))
    rows = sources.load_rows(_blossom_config(path))
    train, held_out = sources.split_rows(rows, 0.01, seed=42)
    again_train, again_held_out = sources.split_rows(rows, 0.01, seed=42)
    assert len(held_out) == 3 and held_out[sources.ROW_ID] == again_held_out[sources.ROW_ID]
    assert not set(train[sources.ROW_ID]) & set(held_out[sources.ROW_ID])
    assert len(train) + len(held_out) == 300


def test_mixed_json_types_in_a_mapped_column_are_refused(tmp_path):
    """HF datasets would type the column as Json and silently turn "007" into 7."""
    path = tmp_path / "rows.jsonl"
    rows = [{"input": "q", "output": "o", "answer": "007"}] * 3 + [{"input": "q", "output": "o", "answer": 7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"rows.jsonl line 4: column 'answer' holds int where line 1 holds str"):
        sources.load_rows(_blossom_config(path))


@pytest.mark.parametrize(
    "conversation,expected",
    [
        ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], "must open with a user turn"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}], "assistant message 1 is empty"),
    ],
)
def test_malformed_conversations_name_the_row(tmp_path, conversation, expected):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    config = DatasetConfig(name="chat", path=str(path), messages_column="messages")
    with pytest.raises(UserError, match=expected):
        messages.to_messages(sources.load_rows(config)[0], config)


def test_empty_and_mixed_inputs_are_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="is empty"):
        sources.load_rows(_blossom_config(empty))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text(json.dumps({"input": "q", "output": "o", "answer": "1"}) + "\n")
    (mixed / "b.csv").write_text("input,output,answer\nq,o,1\n")
    with pytest.raises(UserError, match=r"mixes formats \(.csv, .jsonl\)"):
        sources.load_rows(_blossom_config(mixed))
    typo = DatasetConfig(name="gsm8k", path=str(tmp_path / "trian.jsonl"), hub="huggingface")
    with pytest.raises(UserError, match="does not exist"):
        sources.resolve_path(typo)
