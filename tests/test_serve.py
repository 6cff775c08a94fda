"""The serve stage as a client sees it: one real server process on loopback, the real openai client.

The module trains a LoRA adapter on tiny_qwen2 (30 steps on demo_math, checkpoints at steps 15
and 30), then starts ``python -m npu_recipes stage=serve`` once, serving the base model and both
checkpoints as the adapters ``early`` and ``late``, with an API key. Greedy outputs differ between
the three (base: newlines; each adapter: its own "Answer: ..." text), so a request routed to the
wrong model or answered with another request's tokens shows up as a wrong text or length.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from npu_recipes.serving.launcher import ServerProcess
from tests.helpers import run_in_process

pytestmark = pytest.mark.slow

API_KEY = "test-key-5"
BASE = "tiny_qwen2-v1"
QUESTION = [{"role": "user", "content": "Kofi had 40 apples and gave away 8. How many are left?"}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve_lora") / "run"
    run_in_process("device=cpu", "train.max_steps=30", "train.save_steps=15", "train.learning_rate=1e-2",
                   "train.gradient_accumulation_steps=1", "train.per_device_train_batch_size=4", "lora.r=16",
                   "dataset.val_split_ratio=0", f"output_dir={run}")
    return {"early": run / "checkpoint-15", "late": run / "checkpoint-30"}


@pytest.fixture(scope="module")
def server(checkpoints):
    adapters = "{" + ", ".join(f"{name}: '{path}'" for name, path in checkpoints.items()) + "}"
    with ServerProcess("device=cpu", f"adapters={adapters}", f"serve.api_key={API_KEY}", "serve.max_batch_size=8",
                       "serve.batch_wait_ms=50", "serve.max_tokens_limit=3000") as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client, model=BASE, messages=QUESTION, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kwargs)


def post(server, path, body, key=API_KEY):
    """POST raw bytes (or a JSON-able object); returns (status, parsed JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server.base_url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_models_list_names_base_and_adapters(client):
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, "early", "late"]
    assert [getattr(m, "parent", None) for m in models] == [None, BASE, BASE]
    assert client.models.retrieve("late").id == "late"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


def test_chat_completion_reports_usage_and_finish_reason(client, tiny_model_path):
    from transformers import AutoTokenizer

    reply = chat(client, "late", max_tokens=12)
    assert reply.object == "chat.completion"
    assert reply.model == "late"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.startswith("Answer")
    assert choice.finish_reason == "length"
    prompt = AutoTokenizer.from_pretrained(tiny_model_path).apply_chat_template(QUESTION, add_generation_prompt=True,
                                                                                return_dict=True)["input_ids"]
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == len(prompt) + 12


def test_stop_string_ends_the_completion(client):
    full = chat(client, "late", max_tokens=12).choices[0].message.content
    stop = full[len("Answer:") + 2:][:2]
    assert stop and stop in full
    reply = chat(client, "late", max_tokens=12, stop=[stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full[: full.index(stop)]


def test_streaming_equals_the_whole_answer(client):
    whole = chat(client, "early", max_tokens=10)
    chunks = list(chat(client, "early", max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done_event(server):
    body = {"model": BASE, "prompt": "2 + 2 =", "max_tokens": 3, "temperature": 0, "stream": True}
    request = urllib.request.Request(server.base_url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        events = [line.decode().strip() for line in reply if line.strip()]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_completions_with_several_prompts(client):
    prompts = ["Hana buys 8 boxes", "What is 4 + 4?"]
    together = client.completions.create(model="late", prompt=prompts, max_tokens=8, temperature=0)
    alone = [client.completions.create(model="late", prompt=p, max_tokens=8, temperature=0) for p in prompts]
    assert [c.index for c in together.choices] == [0, 1]
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]
    assert together.usage.completion_tokens == 16
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    streamed = client.completions.create(model="late", prompt=prompts[0], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == alone[0].choices[0].text


def test_choosing_an_adapter_changes_the_output(client):
    texts = {model: chat(client, model, max_tokens=12).choices[0].message.content for model in (BASE, "early", "late")}
    assert len(set(texts.values())) == 3, texts


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_requests_without_the_right_key_get_401(server, headers):
    request = urllib.request.Request(server.base_url + "/v1/models", headers=headers)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 401
    assert json.loads(caught.value.read())["error"]["code"] == "invalid_api_key"
    assert server.health()["status"] == "ok"


def test_wrong_key_through_the_client(server):
    wrong = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


GOOD = {"model": BASE, "messages": QUESTION, "max_tokens": 2}
BAD_REQUESTS = {
    "invalid JSON": b'{"model": "tiny_qwen2-v1", "messages": [',
    "not an object": [1, 2],
    "empty messages": {**GOOD, "messages": []},
    "negative max_tokens": {**GOOD, "max_tokens": -5},
    "huge max_tokens": {**GOOD, "max_tokens": 10**9},
    "max_tokens beyond the context": {**GOOD, "max_tokens": 2999, "messages": [{"role": "user", "content": "7 + 1 = 8. " * 300}]},
    "prompt longer than the context": {**GOOD, "messages": [{"role": "user", "content": "7 + 1 = 8. " * 1500}]},
    "unknown role": {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]},
    "missing content": {**GOOD, "messages": [{"role": "user"}]},
    "max_tokens of the wrong type": {**GOOD, "max_tokens": "many"},
    "messages of the wrong type": {**GOOD, "messages": "hi"},
    "temperature out of range": {**GOOD, "temperature": 7},
    "n above 16": {**GOOD, "n": 17},
    "unsupported field": {**GOOD, "audio": {"voice": "alloy"}},
    "top_logprobs without logprobs": {**GOOD, "top_logprobs": 2},
    "missing model": {"messages": QUESTION},
    "unknown model": {**GOOD, "model": "gpt-5"},
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client, case):
    status, body = post(server, "/v1/chat/completions", BAD_REQUESTS[case])
    assert status == (404 if case == "unknown model" else 400), body
    assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    assert chat(client, max_tokens=2).usage.completion_tokens == 2


def test_bad_completions_prompt_gets_400(server):
    status, body = post(server, "/v1/completions", {"model": BASE, "prompt": {"text": "x"}})
    assert status == 400 and body["error"]["param"].startswith("prompt")


def test_concurrent_greedy_requests_equal_the_same_requests_alone(server, client):
    """32 at once (three models, chat and raw completions, different lengths, each greedy request
    with its own ``seed``, as lm-evaluation-harness sends them) == each alone, and they share batches.

    Batched rows are left-padded; their logits differ from a solo run by float rounding only
    (at most 7e-7 measured, docs/serving.md), far below the gaps between greedy choices here.
    """
    models = [BASE, "early", "late"]
    requests = []
    for i in range(32):
        kwargs = {"model": models[i % 3], "max_tokens": 4 + i % 13, "temperature": 0, "seed": 1234 + i}
        if i % 2:
            kwargs["messages"] = [{"role": "user", "content": f"What is {i} + {i * 7 % 11}?" + " Think." * (i % 5)}]
        else:
            kwargs["prompt"] = f"{i} boxes with {i % 9} pencils" + " each" * (i % 4)
        requests.append(kwargs)

    def summary(reply):
        choice = reply.choices[0]
        text = choice.message.content if hasattr(choice, "message") else choice.text
        return text, choice.finish_reason, reply.usage.prompt_tokens, reply.usage.completion_tokens

    async def send_all():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300) as aclient:
            calls = [aclient.chat.completions.create(**r) if "messages" in r else aclient.completions.create(**r)
                     for r in requests]
            return await asyncio.gather(*calls)

    calls_before = server.health()["batches"]["generate_calls"]
    together = [summary(reply) for reply in asyncio.run(send_all())]
    calls_together = server.health()["batches"]["generate_calls"] - calls_before
    alone = [summary(client.chat.completions.create(**r) if "messages" in r else client.completions.create(**r))
             for r in requests]
    assert calls_together < 32, "no two concurrent requests shared a generate call"
    assert together == alone
    assert len({text for text, *_ in alone}) > 16, "too few distinct answers to tell requests apart"


def assert_one_cancelled_early(server, before, max_tokens):
    """Wait (at most 2 minutes) until /health counts one more cancelled job, which stopped before ``max_tokens``."""
    deadline = time.monotonic() + 120
    while server.health()["batches"]["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.2)
    after = server.health()["batches"]
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completion_tokens"] - before["completion_tokens"] < max_tokens


def test_client_disconnect_stops_generation(server, client):
    before = server.health()["batches"]
    stream = chat(client, "late", max_tokens=2900, stream=True)
    received = 0
    for _ in stream:
        received += 1
        if received == 3:
            break
    stream.close()
    assert_one_cancelled_early(server, before, max_tokens=2900)
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"


def test_client_that_gives_up_on_a_plain_request_stops_its_generation(server, client):
    before = server.health()["batches"]
    host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=2)
    body = json.dumps({"model": "late", "messages": QUESTION, "max_tokens": 2900, "temperature": 0})
    connection.request("POST", "/v1/chat/completions", body=body,
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(TimeoutError):
        connection.getresponse()
    connection.close()
    assert_one_cancelled_early(server, before, max_tokens=2900)


# --- log-probabilities, sampling fields, structured output, tools, metrics (issue 15) ---------------------------


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """The base model in this process, fp32, for plain forward passes: ``logprobs(ids)`` is (len(ids), vocab),
    row i the distribution of the token after ``ids[: i + 1]``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)

    def logprobs(ids):
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    return logprobs, tokenizer


def test_chat_logprobs_equal_a_forward_pass_streamed_or_not(client, reference):
    forward, tokenizer = reference
    reply = chat(client, BASE, max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6 and all(len(entry.top_logprobs) == 3 for entry in content)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"]
    for entry in content:
        row = forward(ids)[-1]
        ids = ids + [int(row.argmax())]
        assert entry.token == tokenizer.decode(ids[-1:])
        assert abs(entry.logprob - float(row[ids[-1]])) < 1e-5
        expected = row.topk(3)
        assert [abs(t.logprob - v) < 1e-5 for t, v in zip(entry.top_logprobs, expected.values.tolist())] == [True] * 3
        assert entry.top_logprobs[0].logprob == max(t.logprob for t in entry.top_logprobs) >= entry.logprob
    streamed = list(chat(client, BASE, max_tokens=6, logprobs=True, top_logprobs=3, stream=True))
    tokens = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 6)) for e in tokens] == [(e.token, round(e.logprob, 6)) for e in content]


def test_echo_scores_token_id_prompts_like_a_forward_pass(client, reference):
    """lm-evaluation-harness' log-likelihood request: token ids, echo, logprobs 1, max_tokens 1 (and 0)."""
    forward, tokenizer = reference
    ids = [tokenizer.encode(text) for text in ("Kofi had 40 apples", "3 + 4 = 7")]
    reply = client.completions.create(model=BASE, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1)
    for choice, prompt in zip(sorted(reply.choices, key=lambda c: c.index), ids):
        scores = choice.logprobs.token_logprobs
        assert scores[0] is None and choice.logprobs.top_logprobs[0] is None and len(scores) == len(prompt) + 1
        table = forward(prompt)
        assert max(abs(scores[i + 1] - float(table[i, prompt[i + 1]])) for i in range(len(prompt) - 1)) < 1e-5
        assert abs(scores[-1] - float(table[-1].max())) < 1e-5
        assert choice.text.startswith(tokenizer.decode(prompt))
        assert all(max(top.values()) >= score for top, score in zip(choice.logprobs.top_logprobs[1:], scores[1:]))
    only = client.completions.create(model=BASE, prompt=ids[0], max_tokens=0, logprobs=0, echo=True)
    assert only.choices[0].text == tokenizer.decode(ids[0]) and only.usage.completion_tokens == 0
    alone, batched = only.choices[0].logprobs.token_logprobs, reply.choices[0].logprobs.token_logprobs[:-1]
    assert alone[0] is None and alone[1:] == pytest.approx(batched[1:], abs=1e-5)
    whole = next(c for c in reply.choices if c.index == 0)
    chunks = [c.choices[0] for c in client.completions.create(model=BASE, prompt=ids[0], max_tokens=1, temperature=0,
                                                               logprobs=1, echo=True, stream=True) if c.choices]
    streamed = [score for c in chunks if c.logprobs for score in c.logprobs.token_logprobs]
    assert "".join(c.text for c in chunks) == whole.text
    assert streamed[0] is None and streamed[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)


def test_n_choices_with_a_seed_are_reproducible_and_streamed(client):
    def texts(**kwargs):
        reply = client.completions.create(model="late", prompt="Hana buys", max_tokens=6, n=3, temperature=1.5, seed=11, **kwargs)
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

    first = texts()
    assert len(first) == 3 and len(set(first)) > 1
    assert texts() == first
    streamed = client.completions.create(model="late", prompt="Hana buys", max_tokens=6, n=3, temperature=1.5, seed=11,
                                         stream=True)
    joined = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            joined[choice.index] += choice.text
    assert joined == first


def test_penalties_bias_and_min_tokens_change_the_tokens(client, reference):
    def tokens(**kwargs):
        reply = chat(client, BASE, max_tokens=8, logprobs=True, **kwargs)
        return [e.token for e in reply.choices[0].logprobs.content], reply

    plain, _ = tokens()
    assert len(set(plain)) < 8, "the greedy base model repeats itself; the penalties must have something to do"
    assert len(set(tokens(presence_penalty=2.0)[0])) == 8
    assert len(set(tokens(frequency_penalty=2.0)[0])) == 8
    penalised = chat(client, BASE, max_tokens=8, presence_penalty=2.0).choices[0].message.content
    chunks = chat(client, BASE, max_tokens=8, presence_penalty=2.0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == penalised
    assert len(tokens(extra_body={"repetition_penalty": 1.3})[0]) == 8
    assert tokens(extra_body={"top_k": 1, "temperature": 1.0})[0] == plain
    tokenizer = reference[1]
    favourite = tokenizer.encode(" apples")[0]
    assert tokens(logit_bias={str(favourite): 100})[0] == [tokenizer.decode([favourite])] * 8
    ends = {str(tokenizer.eos_token_id): 100}
    stops = chat(client, BASE, max_tokens=20, logit_bias=ends)
    assert (stops.choices[0].finish_reason, stops.usage.completion_tokens, stops.choices[0].message.content) == ("stop", 1, "")
    longer = chat(client, BASE, max_tokens=20, logit_bias=ends, extra_body={"min_tokens": 5})
    assert (longer.choices[0].finish_reason, longer.usage.completion_tokens) == ("stop", 6)


def test_structured_output_parses_into_a_pydantic_model(client):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Answer(BaseModel):
        value: int = Field(ge=0, le=99)
        unit: Literal["apples", "pears"]
        note: str = Field(max_length=6)

    parsed = client.chat.completions.parse(model="late", messages=QUESTION, response_format=Answer, max_tokens=60,
                                           temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Answer)
    schema = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": Answer.model_json_schema()}}
    chunks = list(chat(client, BASE, max_tokens=60, response_format=schema, stream=True))
    Answer.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert chunks[-1].choices[0].finish_reason == "stop"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima"]},
                                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}


def test_forced_tool_call_has_arguments_that_validate(client):
    import json

    forced = {"type": "function", "function": {"name": "get_weather"}}
    reply = chat(client, "late", max_tokens=200, tools=[WEATHER], tool_choice=forced)
    choice = reply.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", None), reply
    (call,) = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and arguments["city"] in ("Paris", "Lima") and 1 <= arguments["days"] <= 7
    chunks = list(chat(client, "late", max_tokens=200, tools=[WEATHER], tool_choice=forced, stream=True))
    calls = [d for c in chunks if c.choices and c.choices[0].delta.tool_calls for d in c.choices[0].delta.tool_calls]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("get_weather", arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    required = chat(client, "late", max_tokens=200, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    (only,) = required.choices[0].message.tool_calls
    assert only.function.name == "get_weather" and set(json.loads(only.function.arguments)) == {"city", "days"}
    assert chat(client, "late", max_tokens=4, tools=[WEATHER], tool_choice="none").choices[0].message.tool_calls is None
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
        {"role": "developer", "content": "Answer briefly."},
    ]
    assert chat(client, "late", messages=history, max_tokens=4, tools=[WEATHER]).usage.completion_tokens >= 1


def test_empty_prompts_and_unknown_token_ids_are_400s(server):
    for body in ({"prompt": ""}, {"prompt": "", "stream": True}, {"prompt": ["2 + 2", ""]}, {"prompt": []},
                 {"prompt": [[1, 2], []]}, {"prompt": [5, 10**6]}):
        status, reply = post(server, "/v1/completions", {"model": BASE, "max_tokens": 2, **body})
        assert status == 400 and reply["error"]["param"].startswith("prompt"), (body, reply)
    status, reply = post(server, "/v1/chat/completions", {**GOOD, "logit_bias": {"hello": 5}})
    assert status == 400 and reply["error"]["param"] == "logit_bias"


def test_tokenize_detokenize_and_metrics(server, reference):
    import urllib.request

    _, tokenizer = reference
    status, tokens = post(server, "/tokenize", {"model": BASE, "prompt": "Kofi had 40 apples"})
    assert status == 200 and tokens["tokens"] == tokenizer.encode("Kofi had 40 apples") and tokens["count"] == len(tokens["tokens"])
    status, text = post(server, "/detokenize", {"model": BASE, "tokens": tokens["tokens"]})
    assert (status, text["prompt"]) == (200, "Kofi had 40 apples")
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as reply:
        body = reply.read().decode()
    assert 'npu_recipes_requests_total{route="/v1/chat/completions",status="200"}' in body
    for name in ("npu_recipes_prompt_tokens_total", "npu_recipes_generation_tokens_total",
                 "npu_recipes_time_to_first_token_seconds_count", "npu_recipes_num_requests_waiting",
                 "npu_recipes_batch_occupancy"):
        assert name in body
    assert server.health()["engine"] == "static"


def test_adapters_on_another_base_are_refused_unless_allowed(checkpoints, tiny_model_path):
    from npu_recipes.config.schema import ModelConfig
    from npu_recipes.errors import UserError
    from npu_recipes.infer.adapters import parse_adapters
    from npu_recipes.serving.server import check_base_model

    adapters = parse_adapters({"late": str(checkpoints["late"])})
    check_base_model(ModelConfig(name_or_path=str(tiny_model_path)), adapters, allow_base_mismatch=False)
    other = ModelConfig(name_or_path="Qwen/Qwen2-7B-Instruct")
    with pytest.raises(UserError, match="was trained on .* but model.name_or_path=Qwen/Qwen2-7B-Instruct"):
        check_base_model(other, adapters, allow_base_mismatch=False)
    check_base_model(other, adapters, allow_base_mismatch=True)
