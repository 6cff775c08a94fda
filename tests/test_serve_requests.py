"""Hostile and unusual requests against the serve stage's app, in this process (Starlette's test
client, the static batcher over tiny_qwen2 on the CPU): each is refused alone with a 4xx naming its
field, or served, and never fails other requests or stalls the event loop."""

from __future__ import annotations

import asyncio
import json

import pytest

from npu_recipes.errors import UserError

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def loaded(tiny_model_path):
    from npu_recipes.config.schema import ModelConfig
    from npu_recipes.infer import loading
    from npu_recipes.runtime.devices import Device

    return loading.load(ModelConfig(name_or_path=str(tiny_model_path)), [], Device("cpu", 1))


@pytest.fixture(scope="module")
def client(loaded):
    from fastapi.testclient import TestClient

    from npu_recipes.config.schema import ServeConfig
    from npu_recipes.runtime.devices import Device
    from npu_recipes.serving.app import create_app
    from npu_recipes.serving.server import build_backend

    settings = ServeConfig(engine="static", max_model_len=256, max_request_bytes=4096, batch_wait_ms=50)
    with TestClient(create_app(build_backend(loaded, settings, Device("cpu", 1)))) as test_client:
        yield test_client


def post(client, path: str, body: dict):
    """POST ``body`` as JSON with ASCII escapes (so a lone surrogate travels as ``\\ud800``)."""
    return client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def chat(**fields) -> dict:
    return {"model": "tiny_qwen2-v1", "messages": QUESTION, "max_tokens": 2, **fields}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", chat(seed=2**70), "seed"),
    ("/v1/chat/completions", chat(seed=2**64 - 1, n=2), "seed"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "x\ud800y"}]), "messages.0.content"),
    ("/v1/completions", {"model": "tiny_qwen2-v1", "prompt": ["ok", "x\udfffy"]}, "prompt.1"),
    ("/tokenize", {"prompt": "x\ud800y"}, "prompt"),
    ("/v1/chat/completions", chat(max_tokens=0), "max_tokens"),
    ("/v1/chat/completions", chat(top_logprobs=2), "top_logprobs"),
    ("/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                  tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice.function.name"),
    ("/v1/chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}},
                                         {"type": "function", "function": {"name": "f"}}]), "tools.1.function.name"),
    ("/v1/chat/completions", {**chat(), "logit_bias": {"5": float("nan")}}, "logit_bias.5"),
])
def test_bad_fields_are_400s_naming_the_field(client, path, body, param):
    reply = post(client, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and param.split(".")[0] in error["message"]
    if param.startswith("logit_bias"):
        assert "must be a number in [-100, 100]" in error["message"]


def test_null_means_not_given_for_every_defaulted_field(client):
    nulls = dict.fromkeys(["n", "stream", "logprobs", "presence_penalty", "frequency_penalty", "temperature", "top_p",
                           "stop", "seed", "parallel_tool_calls", "min_tokens", "top_logprobs", "user"])
    reply = post(client, "/v1/chat/completions", chat(**nulls, stream_options={"include_usage": None}))
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 1 and reply.json()["usage"]["completion_tokens"] == 2
    reply = post(client, "/v1/completions", {"model": "tiny_qwen2-v1", "prompt": "2 + 2 =", "max_tokens": 2,
                                             "echo": None, "n": None, "stream": None, "best_of": None, "logprobs": None})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["text"] and not reply.json()["choices"][0]["text"].startswith("2 + 2 =")


def test_a_near_zero_temperature_is_greedy(client):
    greedy = post(client, "/v1/chat/completions", chat(temperature=0, max_tokens=4)).json()
    tiny = post(client, "/v1/chat/completions", chat(temperature=1e-45, max_tokens=4))
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


def test_a_body_over_the_limit_is_413_and_the_loop_keeps_answering(client):
    reply = post(client, "/v1/chat/completions", chat(messages=[{"role": "user", "content": "hello world " * 400}]))
    assert reply.status_code == 413 and "serve.max_request_bytes" in reply.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_a_row_that_cannot_choose_its_token_fails_alone(loaded):
    """Bad settings that slip past the request checks (a seed torch refuses, a temperature whose
    softmax is NaN) fail their own jobs; the greedy and sampled jobs of the same batch finish."""
    from npu_recipes.runtime.devices import Device
    from npu_recipes.serving.decoding import Decoding
    from npu_recipes.serving.generation import Generator
    from npu_recipes.serving.jobs import Channel, Failed, Finished, Job

    ids = loaded.tokenizer("2 + 2 =").input_ids
    settings = [Decoding(), Decoding(do_sample=True, temperature=1e-45), Decoding(do_sample=True, seed=2**70),
                Decoding(do_sample=True, temperature=0.7, seed=1)]

    async def run():
        channel = Channel()
        jobs = [Job(ids, 3, None, decoding, (), channel, index) for index, decoding in enumerate(settings)]
        await asyncio.to_thread(Generator(loaded, Device("cpu", 1)), jobs)
        ends = {}
        while len(ends) < len(jobs):
            event = await channel.get(5)
            if isinstance(event, (Finished, Failed)):
                ends[event.index] = event
        return ends

    ends = asyncio.run(run())
    assert [type(ends[index]).__name__ for index in range(4)] == ["Finished", "Failed", "Failed", "Finished"]
    assert "probability tensor" in ends[1].message and "Overflow" in ends[2].message
    assert ends[0].completion_tokens == ends[3].completion_tokens == 3


def test_max_model_len_beyond_the_context_is_refused(loaded):
    from npu_recipes.serving.server import check_max_model_len

    context = loaded.model.config.max_position_embeddings
    check_max_model_len(context, loaded)
    with pytest.raises(UserError) as refused:
        check_max_model_len(context + 1, loaded)
    assert f"serve.max_model_len={context + 1}" in str(refused.value) and f"{context} tokens" in str(refused.value)
    assert f"serve.max_model_len={context} or less" in refused.value.fix


def test_a_host_not_on_this_machine_gets_a_fix_about_the_host():
    from npu_recipes.serving.server import bind

    # 192.0.2.1 (TEST-NET-1, RFC 5737) is no interface's address: the bind fails here, nothing is sent.
    with pytest.raises(UserError) as refused:
        bind("192.0.2.1", 0)
    assert "serve.host" in refused.value.fix and "serve.port" not in refused.value.fix
