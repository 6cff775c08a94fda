"""Final-answer extraction and scoring, on real GSM8K answers and on blossom-style answers."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from npu_recipes.config import schema
from npu_recipes.data import demo
from npu_recipes.infer import answers


@pytest.fixture(scope="module")
def gsm8k_test_rows(gsm8k_dir):
    return [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()]


def _final_line_value(answer: str) -> int:
    # Independent of answers.py: GSM8K's last line is "#### <integer, maybe with thousands commas>".
    last = answer.rsplit("\n", 1)[-1]
    assert last.startswith("#### ")
    return int(last[len("#### "):].replace(",", ""))


def test_every_gsm8k_test_reference_yields_its_final_number(gsm8k_test_rows):
    assert len(gsm8k_test_rows) == 1319
    for row in gsm8k_test_rows:
        extracted = answers.extract(row["answer"], "gsm8k")
        assert extracted.strict
        assert extracted.value == _final_line_value(row["answer"]), row["answer"][-60:]


def test_known_gsm8k_rows(gsm8k_test_rows):
    # Row 0: Janet's ducks (18); row 146 ends "#### 2,125"; row 489 ends "#### -10".
    assert answers.extract(gsm8k_test_rows[0]["answer"], "gsm8k") == answers.Extracted("18", Fraction(18), True)
    assert answers.extract(gsm8k_test_rows[146]["answer"], "gsm8k").value == 2125
    assert answers.extract(gsm8k_test_rows[489]["answer"], "gsm8k").value == -10


def test_a_reference_scores_itself_correct_and_a_wrong_number_incorrect(gsm8k_test_rows):
    for row in gsm8k_test_rows:
        reference = row["answer"]
        assert answers.score(reference, reference, "gsm8k")["correct"]
        wrong = reference.rsplit("####", 1)[0] + f"#### {_final_line_value(reference) + 1}"
        result = answers.score(wrong, reference, "gsm8k")
        assert not result["correct"] and result["strict"]


def test_response_without_marker_falls_back_to_its_last_number(gsm8k_test_rows):
    reasoning = gsm8k_test_rows[0]["answer"].rsplit("\n", 1)[0]  # "... $<<9*2=18>>18 every day at the farmer's market."
    result = answers.score(reasoning, gsm8k_test_rows[0]["answer"], "gsm8k")
    assert result == {"prediction": "18", "reference_answer": "18", "strict": False, "correct": True}
    assert answers.score("I am not sure.", gsm8k_test_rows[0]["answer"], "gsm8k") == {
        "prediction": None, "reference_answer": "18", "strict": False, "correct": False}


@pytest.mark.parametrize("prediction, reference, correct", [
    ("#### 70,000.00", "#### 70000", True),
    ("so the answer is #### $1,450,000.", "#### 1,450,000", True),
    ("#### 18 dollars", "#### 18", True),
    ("#### 17.99", "#### 18", False),
    ("#### 0.5", "#### 1/2", True),
    ("#### 12\nwait, #### 13", "#### 13", True),
])
def test_numbers_compare_numerically(prediction, reference, correct):
    assert answers.score(prediction, reference, "gsm8k")["correct"] is correct


def test_blossom_answers():
    rows = demo.generate(50, seed=7)
    for row in rows:
        reference = f"{row['output']}\n\nAnswer: {row['answer']}"
        assert answers.extract(reference, "blossom").value == int(row["answer"])
    assert answers.score("x\n\nAnswer: 3/4", "y\n\nAnswer: 0.75", "blossom")["correct"]
    assert answers.score("Answer: Monday", "answer:  monday", "blossom")["correct"]
    assert not answers.score("Answer: Tuesday", "Answer: Monday", "blossom")["correct"]


def test_every_schema_answer_format_has_a_marker():
    assert set(answers.MARKERS) == set(schema.ANSWER_FORMATS)


@given(st.integers(min_value=-10**12, max_value=10**12), st.sampled_from(["gsm8k", "blossom"]))
def test_any_integer_with_thousands_separators_round_trips(number, answer_format):
    marker = "####" if answer_format == "gsm8k" else "Answer:"
    assert answers.extract(f"work\n{marker} {number:,}", answer_format).value == number


@given(st.decimals(min_value=-10**6, max_value=10**6, places=3, allow_nan=False, allow_infinity=False))
def test_decimals_round_trip_exactly(number):
    assert answers.extract(f"#### {number}", "gsm8k").value == Fraction(number)
