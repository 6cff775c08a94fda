"""Final-answer extraction and exact-match scoring for math datasets (``dataset.answer_format``).

* ``gsm8k``: the answer follows ``####`` (GSM8K's reference format, e.g. ``#### 1,450,000``);
* ``blossom``: the answer follows ``Answer:`` (how blossom-math-v2 and demo_math are mapped:
  ``{output}\\n\\nAnswer: {answer}``).

A response without the marker falls back to its last number, as lm-evaluation-harness's
"flexible-extract" filter for GSM8K does; ``strict`` records whether the marker was there.
Numbers compare numerically (``1,000`` = ``1000.0``; ``3/4`` = ``0.75``) as exact fractions, so
no float tolerance is involved; text that is not a number compares after whitespace and case
folding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Optional

# One entry per schema.ANSWER_FORMATS name (tests/test_answers.py checks they agree).
MARKERS: Dict[str, re.Pattern] = {
    "gsm8k": re.compile(r"####\s*(.*)"),
    "blossom": re.compile(r"Answer:\s*(.*)", re.IGNORECASE),
}

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


@dataclass(frozen=True)
class Extracted:
    """A final answer found in a text.

    ``text`` is the answer as written (None when nothing was found), ``value`` its exact numeric
    value when it is a number, ``strict`` True when it followed the format's marker.
    """

    text: Optional[str]
    value: Optional[Fraction]
    strict: bool


def to_number(text: str) -> Optional[Fraction]:
    """The exact value of a number written like ``-1,450,000``, ``$18``, ``2.50``, ``3/4`` or ``18.``; else None."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "").strip()
    if not _NUMBER.fullmatch(cleaned):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def extract(text: str, answer_format: str) -> Extracted:
    """Find the final answer of ``text`` under ``answer_format`` (``gsm8k`` or ``blossom``).

    The last marker's line wins (a model may restate the answer); its text is the answer when it
    is a number, else the first number on that line, else the line itself. Without a marker, the
    last number in the text (``strict=False``).

    Raises:
        KeyError: an ``answer_format`` not in :data:`MARKERS` (config validation prevents it).
    """
    found = MARKERS[answer_format].findall(text)
    if found:
        line = found[-1].strip()
        value = to_number(line)
        if value is None:
            first = _NUMBER.search(line)
            if first is not None:
                return Extracted(first.group(0), to_number(first.group(0)), True)
        return Extracted(line or None, value, True)
    numbers = _NUMBER.findall(text)
    if not numbers:
        return Extracted(None, None, False)
    return Extracted(numbers[-1], to_number(numbers[-1]), False)


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def matches(prediction: Extracted, reference: Extracted) -> bool:
    """Exact match: equal numbers when both are numbers, else equal normalised text; never for a missing answer."""
    if prediction.text is None or reference.text is None:
        return False
    if prediction.value is not None and reference.value is not None:
        return prediction.value == reference.value
    return _normalised(prediction.text) == _normalised(reference.text)


def score(response: str, reference: str, answer_format: str) -> Dict[str, object]:
    """Extract both answers and compare them: ``{"prediction", "reference_answer", "strict", "correct"}``."""
    predicted = extract(response, answer_format)
    expected = extract(reference, answer_format)
    return {
        "prediction": predicted.text,
        "reference_answer": expected.text,
        "strict": predicted.strict,
        "correct": matches(predicted, expected),
    }
