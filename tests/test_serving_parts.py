"""The serving parts without a server: streamed detokenization with stop strings, and batch grouping."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_recipes.serving.batcher import Batcher
from npu_recipes.serving.decoding import Decoding
from npu_recipes.serving.generation import RowText
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


# --- per-row decoding, grammars, tool calls, request checks (issue 15) ---------------------------------------


def test_presence_and_frequency_penalties_follow_openais_formula():
    import torch

    from npu_recipes.serving.decoding import presence_frequency_penalty

    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    penalised = presence_frequency_penalty(scores, [1, 1, 3], presence=0.5, frequency=0.25)
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence, c counting the completion's tokens only.
    assert penalised.tolist() == [1.0, 2.0 - 2 * 0.25 - 0.5, 3.0, 4.0 - 0.25 - 0.5]
    assert presence_frequency_penalty(scores, [], 2.0, 2.0) is scores


def test_decoding_settings_follow_openai_and_the_model_defaults():
    from types import SimpleNamespace

    from npu_recipes.serving.decoding import Decoding

    sampling_model = SimpleNamespace(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    greedy_model = SimpleNamespace(do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=None)
    assert Decoding.resolve(sampling_model, temperature=0, top_p=0.5, top_k=None, seed=3) == Decoding(
        do_sample=False, seed=3, repetition_penalty=1.05)
    assert Decoding.resolve(sampling_model, temperature=None, top_p=None, top_k=None) == Decoding(
        do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert Decoding.resolve(greedy_model, temperature=None, top_p=None, top_k=None) == Decoding()
    assert Decoding.resolve(greedy_model, temperature=None, top_p=None, top_k=5).do_sample


def test_each_row_decodes_by_its_own_settings_in_one_processor_call():
    import torch

    from npu_recipes.serving.decoding import Decoding, Row, RowsProcessor, TokenChoice

    cpu = torch.device("cpu")
    scores = torch.tensor([[0.0, 5.0, 1.0, 2.0]] * 4)
    rows = [Row(Decoding(), 2, [0], cpu),                                               # greedy: token 1
            Row(Decoding(logit_bias=((3, 10.0),)), 2, [0], cpu),                         # biased: token 3
            Row(Decoding(do_sample=True, top_k=1, seed=5), 2, [0], cpu),                 # top-1 sampling: token 1
            Row(Decoding(top_logprobs=2), 2, [0], cpu, stopped=True)]                    # stopped: fallback 0
    out = RowsProcessor(rows, [0, 0, 0, 0], fallback_token=0)(torch.tensor([[7, 8]] * 4), scores)
    assert out.argmax(-1).tolist() == [1, 3, 1, 0]
    assert torch.isinf(out).sum() == 4 * 3
    penalised = Row(Decoding(presence_penalty=4.0, top_logprobs=1), 2, [0], cpu, generated=[1])
    picked = RowsProcessor([penalised], [0], 0)(torch.tensor([[7, 8, 1]]), scores[:1]).argmax(-1).tolist()
    raw = torch.log_softmax(scores[0], -1)
    # Token 1 (5.0) drops to 1.0 below token 3 (2.0); the reported log-probabilities stay the raw model's.
    assert picked == [3] and penalised.choices == [TokenChoice(3, float(raw[3]), ((1, float(raw[1])),))]


def test_min_tokens_keeps_the_end_of_turn_token_away():
    import torch

    from npu_recipes.serving.decoding import Decoding, Row

    row = Row(Decoding(min_tokens=2), prompt_length=3, eos=[0], device=torch.device("cpu"))
    scores = torch.tensor([9.0, 1.0, 2.0])
    assert row.choose(torch.tensor([[5, 6, 7, 8]]), scores) == 2   # one new token so far: EOS still suppressed
    assert row.choose(torch.tensor([[5, 6, 7, 8, 9]]), scores) == 0


@pytest.mark.parametrize("seed", range(4))
def test_grammar_walks_always_give_json_that_validates(tokenizer, seed):
    """Random tokens among the allowed ones (a worst-case model) until the grammar ends: strict JSON, valid."""
    import json

    import torch

    from npu_recipes.serving.grammar import Grammars

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "s": {"type": "string", "maxLength": 4}},
              "required": ["n", "s"], "additionalProperties": False}
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    matcher, generator, ids = grammars.json_schema(schema), torch.Generator().manual_seed(seed), []
    while not matcher.terminated and len(ids) < 200:
        token = int(torch.argmax(matcher.mask(torch.rand(1, len(tokenizer), generator=generator))))
        matcher.accept(token)
        ids.append(token)
    value = json.loads(tokenizer.decode(ids[:-1]))
    assert ids[-1] == tokenizer.eos_token_id and set(value) == {"n", "s"} and 0 <= value["n"] <= 9 and len(value["s"]) <= 4


def test_tool_calls_are_parsed_from_qwen_blocks_and_held_back_while_streaming():
    from npu_recipes.serving.tools import ToolTextFilter, parse_tool_calls

    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": "a\tb"}}\n</tool_call>\n<tool_call>\nnot json</tool_call>'
    content, calls = parse_tool_calls(text, ["f"])
    assert calls == [("f", '{"x": "a\\tb"}')]
    assert content == "Let me check.\n\n<tool_call>\nnot json</tool_call>"
    assert parse_tool_calls('<tool_call>{"name": "g", "arguments": {}}</tool_call>', ["f"])[1] == []
    stream, sent = ToolTextFilter(), []
    for piece in ["Let me", " check.\n<to", "ol_call>\n{", '"name": "f"}</tool_call>']:
        sent.append(stream.feed(piece))
    assert "".join(sent) == "Let me check.\n" and stream.held().startswith("<tool_call>")


def test_a_template_without_tools_gets_them_in_a_system_turn(tokenizer):
    from npu_recipes.serving.tools import render_chat, template_uses_tools

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "c1",
                                                                     "function": {"name": "get_weather", "arguments": {}}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    assert not template_uses_tools(tokenizer)
    text = render_chat(tokenizer, messages, [tool], template_has_tools=False)
    assert '"name": "get_weather"' in text.split("<|im_end|>")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")


def test_unsupported_fields_and_empty_prompts_are_named():
    from npu_recipes.serving import protocol

    request = protocol.CompletionRequest(model="m", prompt=["ok", ""], suffix="x", service_tier="auto")
    assert request.unsupported()[0] == "suffix"
    assert request.prompt_problem(10) == ("prompt.1", "prompt.1 is empty; send at least one character or token id")
    assert protocol.CompletionRequest(model="m", prompt=[3, 12]).prompt_problem(10)[1].startswith("prompt holds token id 12")
    assert protocol.CompletionRequest(model="m", prompt=[[3], [4]]).prompts() == [[3], [4]]
    assert protocol.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                          functions=[]).unsupported() is None
    tiers = [protocol.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                            service_tier=tier).unsupported() for tier in ("default", "flex")]
    assert tiers[0] is None and tiers[1][0] == "service_tier"


@pytest.mark.slow
def test_continuous_engine_finishes_a_short_job_during_a_long_one_with_the_static_engines_tokens(tiny_model_path):
    """The point of continuous batching, by event order (no clock): a short job sent while a long one
    generates finishes first, and its text equals the static batcher's for the same prompt."""
    from npu_recipes.config.schema import ModelConfig, ServeConfig
    from npu_recipes.infer import loading
    from npu_recipes.runtime.devices import Device
    from npu_recipes.serving import engines
    from npu_recipes.serving.generation import Generator
    from npu_recipes.serving.jobs import Delta, Finished
    from npu_recipes.serving.metrics import Metrics

    device = Device("cpu", 1)
    loaded = loading.load(ModelConfig(name_or_path=str(tiny_model_path)), [], device)
    settings = ServeConfig(engine="continuous", max_batch_size=4, max_model_len=256)
    ids = [loaded.tokenizer(text).input_ids for text in ("Tell me a long story.", "What is 12 + 30?")]

    async def scenario():
        engine = engines.create(loaded, settings, device, Metrics(settings.max_batch_size))
        engine.start()
        long, short = Channel(), Channel()
        order, texts = [], {"long": "", "short": ""}
        try:
            engine.submit([Job(ids[0], 64, None, Decoding(), (), long)])
            first = await long.get(120)
            assert isinstance(first, Delta)
            engine.submit([Job(ids[1], 8, None, Decoding(), (), short)])
            pending = {"long": long, "short": short}
            while pending:
                for name, channel in list(pending.items()):
                    event = await channel.get(0.05)
                    if isinstance(event, Delta):
                        texts[name] += event.text
                    elif event is not None:
                        assert isinstance(event, Finished), event
                        order.append((name, event.finish_reason, event.completion_tokens))
                        del pending[name]
        finally:
            await asyncio.to_thread(engine.close, 60)
        alone = Channel()
        await asyncio.to_thread(Generator(loaded, device), [Job(ids[1], 8, None, Decoding(), (), alone)])
        static_text = ""
        while not isinstance(event := await alone.get(5), Finished):
            static_text += event.text
        return engine.name, order, texts["short"], static_text

    name, order, short_text, static_text = asyncio.run(scenario())
    assert name == "continuous"
    assert order == [("short", "length", 8), ("long", "length", 64)]
    assert short_text == static_text and short_text
