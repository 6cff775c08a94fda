"""The serving parts without a server: streamed detokenization with stop strings, and batch grouping."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_recipes.serving.batcher import Batcher
from npu_recipes.serving.generation import RowText
from npu_recipes.serving.decoding import Decoding
from npu_recipes.serving.jobs import Channel, Job


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def stream(tokenizer, text, stop):
    """Feed ``text``'s tokens one by one; returns (pieces released, whether a stop string ended it)."""
    row, pieces = RowText(tokenizer, stop), []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        piece, stopped = row.add(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    return pieces + [row.flush()], False


TEXT = st.text(alphabet=st.sampled_from(list("0123456789 +=abc\n") + ["é", "🙂", "数"]), max_size=40)


@settings(max_examples=150, deadline=None)
@given(text=TEXT, stop=st.lists(st.text(alphabet=st.sampled_from(list("0123456789 =ab🙂")), min_size=1, max_size=3), max_size=3))
def test_streamed_pieces_add_up_to_the_text_before_a_stop_string(tokenizer, text, stop):
    """What is sent is a prefix of the text with no stop string in it, followed in the text by a stop string
    (or, when no stop string occurs, the whole text)."""
    pieces, stopped = stream(tokenizer, text, stop)
    sent = "".join(pieces)
    assert stopped == any(s in text for s in stop)
    assert text.startswith(sent) and not any(s in sent for s in stop)
    assert any(text[len(sent):].startswith(s) for s in stop) if stopped else sent == text
    assert not any("\ufffd" in piece for piece in pieces), "a half-decoded character was sent"


def test_text_that_may_begin_a_stop_string_is_held_back(tokenizer):
    row = RowText(tokenizer, ["STOP"])
    released = "".join(row.add(token)[0] for token in tokenizer("abc ST", add_special_tokens=False)["input_ids"])
    assert released == "abc"
    assert row.flush() == " ST"


def test_batches_group_equal_models_and_keep_arrival_order():
    """Jobs a0 b1 a2 a3 b4 queued while a0 runs, batches of at most 2: then (b1 b4), then (a2 a3)."""

    async def scenario():
        channel, calls, first_started, release = Channel(), [], threading.Event(), threading.Event()

        def run_batch(jobs):
            first_started.set()
            release.wait(30)
            calls.append([(job.adapter, job.index) for job in jobs])
            for job in jobs:
                job.finish("stop")

        batcher = Batcher(run_batch, max_batch_size=2, wait_s=0)
        batcher.start()
        jobs = [Job([1, 2], 1, adapter, Decoding(), (), channel, index)
                for index, adapter in enumerate(["a", "b", "a", "a", "b"])]
        batcher.submit(jobs[:1])
        await asyncio.to_thread(first_started.wait, 30)
        batcher.submit(jobs[1:])
        release.set()
        await asyncio.to_thread(batcher.close, 30)
        return calls, batcher.stats

    calls, stats = asyncio.run(scenario())
    assert calls == [[("a", 0)], [("b", 1), ("b", 4)], [("a", 2), ("a", 3)]]
    assert (stats.generate_calls, stats.largest_batch, stats.completed) == (3, 2, 5)


def test_cancelled_jobs_leave_the_queue_and_greedy_seeded_and_sampled_jobs_share_a_batch():
    async def scenario():
        channel, calls, first_started, release = Channel(), [], threading.Event(), threading.Event()

        def run_batch(jobs):
            first_started.set()
            release.wait(30)
            calls.append([job.index for job in jobs])
            for job in jobs:
                job.finish("length")

        batcher = Batcher(run_batch, max_batch_size=8, wait_s=0)
        batcher.start()
        greedy, seeded = Decoding(seed=7), Decoding(do_sample=True, temperature=0.5, seed=3)
        jobs = [Job([1], 1, None, greedy, (), channel, 0), Job([1], 1, None, greedy, (), channel, 1),
                Job([1], 1, None, greedy, (), channel, 2), Job([1], 1, None, seeded, (), channel, 3),
                Job([1], 1, None, seeded, (), channel, 4)]
        batcher.submit(jobs[:1])
        await asyncio.to_thread(first_started.wait, 30)
        batcher.submit(jobs[1:])
        jobs[1].cancel()
        release.set()
        await asyncio.to_thread(batcher.close, 30)
        return calls, batcher.stats

    calls, stats = asyncio.run(scenario())
    assert calls == [[0], [2, 3, 4]]
    assert (stats.completed, stats.cancelled) == (4, 1)
