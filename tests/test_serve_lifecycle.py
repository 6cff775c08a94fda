"""The serve stage's life cycle: bad serve.* settings, a busy port, SIGTERM during requests, no run directory."""

from __future__ import annotations

import signal
import socket

import openai
import pytest

from npu_recipes.serving.launcher import ServerProcess
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("override, expected", [
    ("serve.port=70000", "serve.port=70000 is not a TCP port"),
    ("serve.max_batch_size=0", "serve.max_batch_size=0 must be > 0"),
    ("serve.default_max_tokens=9000", "serve.default_max_tokens=9000 exceeds serve.max_tokens_limit=4096"),
    ("serve.api_key=''", "serve.api_key is empty"),
    ("serve.log_level=loud", "serve.log_level='loud' is not valid"),
])
def test_bad_serve_settings_fail_before_loading(override, expected):
    result = run_cli("stage=serve", "device=cpu", override)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_busy_port_is_a_clear_error(tiny_model_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_cli("stage=serve", "device=cpu", f"serve.port={port}")
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_sigterm_finishes_in_flight_requests_then_exits(tmp_path, tiny_model_path):
    """SIGTERM while two streamed requests are generating: both complete, then the process exits.

    The server runs in an empty directory, which must still be empty afterwards (serve writes no run directory).
    """
    server = ServerProcess("device=cpu", env={"PYTHONPATH": str(REPO)}, cwd=str(tmp_path))
    with server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="-", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": "What is 2 + 3?"}]
        streams = [iter(client.chat.completions.create(model="tiny_qwen2-v1", messages=messages, max_tokens=tokens,
                                                       temperature=0, stream=True,
                                                       stream_options={"include_usage": True}))
                   for tokens in (120, 150)]
        chunks = [[next(stream)] for stream in streams]
        server.process.send_signal(signal.SIGTERM)
        for received, stream in zip(chunks, streams):
            received.extend(stream)
        status = server.process.wait(120)
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
    finishes = [[c.choices[0].finish_reason for c in received if c.choices and c.choices[0].finish_reason]
                for received in chunks]
    assert finishes == [["length"], ["length"]]
    assert [received[-1].usage.completion_tokens for received in chunks] == [120, 150]
    assert status == -signal.SIGTERM, server.output()
    assert "Waiting for connections to close" in server.output()
    assert list(tmp_path.iterdir()) == []
