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
    """32 at once (three models, chat and raw completions, different lengths) == each alone.

    Batched rows are left-padded; their logits differ from a solo run by float rounding only
    (at most 7e-7 measured, docs/serving.md), far below the gaps between greedy choices here.
    """
    models = [BASE, "early", "late"]
    requests = []
    for i in range(32):
        kwargs = {"model": models[i % 3], "max_tokens": 4 + i % 13, "temperature": 0}
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
