"""Load test for the serve stage through the real ``openai`` client, both engines in one run.

    python bench/serve_load.py --start "device=cpu serve.max_batch_size=32"       # static and continuous
    python bench/serve_load.py --base-url http://127.0.0.1:8000 --model Qwen2-7B-Instruct

With ``--start``, a server is started (and stopped) per engine in ``--engines`` (``serve.engine=``);
with ``--base-url`` the running server is measured. For each concurrency in ``--concurrency``
(default 1, 8, 32) it sends ``--requests`` greedy chat completions (at least the concurrency), at
most that many at a time, with GSM8K test questions as prompts (../shared/data/gsm8k/test.jsonl;
generated demo_math questions when that is absent), and reports requests/s (completed requests /
wall seconds), p50 and p99 latency (seconds from sending a request to its full answer;
nearest-rank percentiles) and generated tokens/s (sum of ``usage.completion_tokens`` / wall
seconds). Then the short-during-long test: the median latency of a ``--short-tokens`` request
alone (3 tries), and of the same request sent while a ``--long-tokens`` streamed request is
generating (3 tries, each with its own long request, which is closed afterwards); their ratio is
what continuous batching is for. JSON goes to bench/results/ with the server's device, dtype,
package versions and the client machine's load average (a loaded CPU slows every figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import openai

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import results_io  # bench/ is on sys.path when a script in it runs

from npu_recipes.serving.launcher import ServerProcess

GSM8K_TEST = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def questions(count: int) -> tuple:
    """``count`` prompts and where they came from."""
    if GSM8K_TEST.is_file():
        rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()[:count]]
        return [row["question"] for row in rows], str(GSM8K_TEST)
    from npu_recipes.data import demo

    return [row["input"] for row in demo.generate(count, seed=7)], "demo_math (generated)"


def percentile(values: list, fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (``fraction`` in (0, 1])."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def health(base_url: str) -> dict:
    with urllib.request.urlopen(base_url + "/health", timeout=30) as reply:
        return json.loads(reply.read())


async def load(base_url: str, api_key: str, model: str, prompts: list, concurrency: int, max_tokens: int,
               temperature: float) -> tuple:
    """Send every prompt, ``concurrency`` at a time; returns (latencies s, completion tokens, wall s)."""
    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=3600) as client:
        async def one(prompt: str) -> tuple:
            async with gate:
                started = time.perf_counter()
                reply = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=temperature,
                )
                return time.perf_counter() - started, reply.usage.completion_tokens

        started = time.perf_counter()
        results = await asyncio.gather(*(one(prompt) for prompt in prompts))
        wall = time.perf_counter() - started
    return [r[0] for r in results], [r[1] for r in results], wall


def measure(args, base_url: str) -> dict:
    """Every concurrency level and the short-during-long test on one running server."""
    info = health(base_url)
    model = args.model or info["models"][0]
    levels = {}
    for concurrency in args.concurrency:
        prompts, source = questions(max(args.requests, concurrency))
        latencies, tokens, wall = asyncio.run(
            load(base_url, args.api_key, model, prompts, concurrency, args.max_tokens, 0.0))
        levels[str(concurrency)] = {
            "requests": len(prompts),
            "wall_s": round(wall, 3),
            "requests_per_s": round(len(prompts) / wall, 3),
            "latency_p50_s": round(percentile(latencies, 0.50), 3),
            "latency_p99_s": round(percentile(latencies, 0.99), 3),
            "generated_tokens": sum(tokens),
            "generated_tokens_per_s": round(sum(tokens) / wall, 1),
        }
    return {"engine": info.get("engine"), "model": model, "prompts": source, "by_concurrency": levels,
            "short_during_long": asyncio.run(short_during_long(base_url, args.api_key, model, args.short_tokens,
                                                               args.long_tokens))}


async def short_during_long(base_url: str, api_key: str, model: str, short_tokens: int, long_tokens: int) -> dict:
    """Median latency (s) of a short request alone and while a long streamed request generates."""
    question = [{"role": "user", "content": "What is 12 + 30?"}]
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=3600) as client:
        async def short() -> float:
            started = time.perf_counter()
            await client.chat.completions.create(model=model, messages=question, max_tokens=short_tokens, temperature=0)
            return time.perf_counter() - started

        solo = [await short() for _ in range(3)]
        during, long_generated = [], []
        for _ in range(3):
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=long_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True})
            received = 0
            async for chunk in stream:
                received += bool(chunk.choices and chunk.choices[0].delta.content)
                if received >= 2:
                    break
            during.append(await short())
            await stream.close()
            long_generated.append(received)
    solo_s, during_s = sorted(solo)[1], sorted(during)[1]
    return {"short_tokens": short_tokens, "long_tokens": long_tokens, "solo_s": round(solo_s, 3),
            "during_long_s": round(during_s, 3), "ratio": round(during_s / solo_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--start", help="overrides for the servers to start here, e.g. 'device=cpu serve.max_batch_size=32'")
    parser.add_argument("--engines", default="static,continuous", help="serve.engine values to compare (with --start)")
    parser.add_argument("--model", help="model id (default: the server's base model)")
    parser.add_argument("--api-key", default="-", help="the server's serve.api_key, if it has one")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least the level)")
    parser.add_argument("--concurrency", type=lambda text: [int(v) for v in text.split(",")], default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--short-tokens", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=2000)
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    engines = {}
    if args.start is not None:
        for engine in args.engines.split(","):
            with ServerProcess(*shlex.split(args.start), f"serve.engine={engine}", cwd=str(REPO)) as server:
                info = health(server.base_url)
                engines[engine] = measure(args, server.base_url)
    else:
        info = health(args.base_url.rstrip("/"))
        engines[info.get("engine", "unknown")] = measure(args, args.base_url.rstrip("/"))
    record = {
        "server": {key: info.get(key) for key in ("device", "dtype", "max_model_len", "versions")},
        "client_versions": {"openai": metadata.version("openai"), "python": sys.version.split()[0]},
        # Other work on the machine slows a CPU server down: the 1-minute load average, before and after.
        "client_host_load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "settings": {"max_tokens": args.max_tokens, "server_overrides": args.start, "temperature": 0.0},
        "results": engines,
    }
    results_io.write(record, "serve_load", record["server"]["device"], args.tag, timestamp=True)


if __name__ == "__main__":
    main()
