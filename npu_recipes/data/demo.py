"""``demo_math``: arithmetic word problems generated deterministically, in blossom-math-v2's schema.

Each row has ``input`` (the problem), ``output`` (a worked solution) and ``answer`` (the final
number as text), exactly the columns of ModelScope's ``AI-ModelScope/blossom-math-v2``, so the
same dataset config maps both. Every answer is computed, never templated, so it is correct.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Dict, List

GENERATOR_VERSION = 1

_NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena", "Mateo", "Noor"]
_ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "shells", "coins", "cards", "stamps"]


def _add(rng: random.Random) -> Dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 90), rng.randint(2, 90)
    return {
        "input": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        "output": f"{name} starts with {a} {item} and gets {b} more, so {name} has {a} + {b} = {a + b} {item}.",
        "answer": str(a + b),
    }


def _subtract(rng: random.Random) -> Dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a = rng.randint(20, 99)
    b = rng.randint(1, a - 1)
    return {
        "input": f"{name} had {a} {item} and gave away {b}. How many {item} are left?",
        "output": f"{name} gave away {b} of {a} {item}, leaving {a} - {b} = {a - b} {item}.",
        "answer": str(a - b),
    }


def _multiply(rng: random.Random) -> Dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    boxes, per_box = rng.randint(2, 12), rng.randint(2, 15)
    return {
        "input": f"{name} buys {boxes} boxes with {per_box} {item} in each box. How many {item} is that?",
        "output": f"Each of the {boxes} boxes holds {per_box} {item}, so there are {boxes} * {per_box} = {boxes * per_box} {item}.",
        "answer": str(boxes * per_box),
    }


def _divide(rng: random.Random) -> Dict[str, str]:
    item = rng.choice(_ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    total = friends * each
    return {
        "input": f"{total} {item} are shared equally among {friends} friends. How many {item} does each friend get?",
        "output": f"Sharing {total} {item} among {friends} friends gives each {total} / {friends} = {each} {item}.",
        "answer": str(each),
    }


def _two_step(rng: random.Random) -> Dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    packs, per_pack, eaten = rng.randint(2, 8), rng.randint(3, 10), rng.randint(1, 5)
    total = packs * per_pack
    return {
        "input": f"{name} opens {packs} packs of {per_pack} {item} and loses {eaten}. How many {item} remain?",
        "output": (
            f"The packs hold {packs} * {per_pack} = {total} {item}. "
            f"After losing {eaten}, {total} - {eaten} = {total - eaten} remain."
        ),
        "answer": str(total - eaten),
    }


def _price(rng: random.Random) -> Dict[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    count, price, paid = rng.randint(2, 9), rng.randint(2, 9), 100
    cost = count * price
    return {
        "input": f"{name} buys {count} {item} at ${price} each and pays with ${paid}. How much change is due?",
        "output": f"The {item} cost {count} * {price} = ${cost}, so the change is {paid} - {cost} = ${paid - cost}.",
        "answer": str(paid - cost),
    }


_TEMPLATES: List[Callable[[random.Random], Dict[str, str]]] = [_add, _subtract, _multiply, _divide, _two_step, _price]


def generate(num_rows: int, seed: int = 0) -> List[Dict[str, str]]:
    """Return ``num_rows`` problems; the same (``num_rows``, ``seed``) always gives the same rows."""
    rng = random.Random(seed)
    return [rng.choice(_TEMPLATES)(rng) for _ in range(num_rows)]


def write(path: Path, num_rows: int) -> None:
    """Write ``num_rows`` generated rows as JSON lines to ``path`` (used as a dataset builder)."""
    with open(path, "w", encoding="utf-8") as handle:
        for row in generate(num_rows):
            handle.write(json.dumps(row) + "\n")
