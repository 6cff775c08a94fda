"""Start ``python -m npu_recipes stage=serve ...`` as a child process and wait until it answers.

For tests and benchmarks, which need a real server on a free loopback port::

    with ServerProcess("model=tiny_qwen2", "device=cpu") as server:
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="-")...

The server is started with ``serve.port=0`` (the kernel picks a free port) unless the overrides
name a port; its start-up line gives the address. Leaving the ``with`` block sends SIGTERM (the
server finishes in-flight requests) and kills it if it has not exited within ``stop_timeout_s``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import List, Optional

READY_MESSAGE = "npu_recipes serve: listening on"
"""Start of the line the serve stage prints once the model is loaded and the port bound: ``... http://HOST:PORT``."""

_URL = re.compile(re.escape(READY_MESSAGE) + r" (http://\S+)")


class ServerProcess:
    """A serve-stage child process (see the module docstring).

    Args:
        overrides: command-line overrides after ``stage=serve``.
        env: extra environment variables for the child.
        cwd: the child's working directory (default: this one).
        start_timeout_s: how long to wait for the model to load and ``/health`` to answer.
        stop_timeout_s: how long :meth:`stop` waits after SIGTERM before killing.
    """

    def __init__(self, *overrides: str, env: Optional[dict] = None, cwd: Optional[str] = None,
                 start_timeout_s: float = 300, stop_timeout_s: float = 60):
        self.overrides = list(overrides)
        if not any(o.startswith("serve.port=") for o in self.overrides):
            self.overrides.append("serve.port=0")
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: Optional[subprocess.Popen] = None
        self.base_url: Optional[str] = None
        self.lines: List[str] = []
        self._address_seen = threading.Event()

    def _read_output(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            match = _URL.search(line)
            if match and self.base_url is None:
                self.base_url = match.group(1)
                self._address_seen.set()
        self._address_seen.set()

    def output(self, last: int = 60) -> str:
        """The child's last ``last`` lines of stdout and stderr (merged)."""
        return "\n".join(self.lines[-last:])

    def health(self) -> dict:
        """``GET /health`` as a dict.

        Raises:
            urllib.error.URLError: the server does not answer.
        """
        with urllib.request.urlopen(self.base_url + "/health", timeout=10) as reply:
            return json.loads(reply.read())

    def start(self) -> "ServerProcess":
        """Start the child and wait until ``/health`` answers.

        Raises:
            RuntimeError: the child exited or did not answer within ``start_timeout_s`` (with its output).
        """
        self.process = subprocess.Popen(
            [sys.executable, "-m", "npu_recipes", "stage=serve", *self.overrides],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, cwd=self.cwd,
        )
        threading.Thread(target=self._read_output, name="serve-output", daemon=True).start()
        deadline = time.monotonic() + self.start_timeout_s
        self._address_seen.wait(self.start_timeout_s)
        while self.base_url is not None and time.monotonic() < deadline and self.process.poll() is None:
            try:
                self.health()
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start (exit status {self.process.returncode}):\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig``, wait up to ``stop_timeout_s`` seconds, kill if still running; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(self.stop_timeout_s)
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
