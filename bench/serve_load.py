"""Load test for the serve stage: N concurrent requests through the real ``openai`` client.

    python bench/serve_load.py --base-url http://127.0.0.1:8000 --model Qwen2-7B-Instruct
    python bench/serve_load.py --start "device=cpu serve.max_batch_size=8"   # starts (and stops) a server

Sends ``--requests`` chat completions, at most ``--concurrency`` at a time, with GSM8K test
questions as prompts (../shared/data/gsm8k/test.jsonl; generated demo_math questions when that is
absent). Reports requests/s (completed requests / wall seconds), p50 and p99 latency (seconds from
sending a request to its full answer; nearest-rank percentiles), generated tokens/s (sum of
``usage.completion_tokens`` / wall seconds) and the mean batch size (jobs / generate calls, from
the server's /health counters), and writes them as JSON to bench/results/ with the server's
device, dtype and package versions.
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


def run(args, base_url: str) -> dict:
    info = health(base_url)
    model = args.model or info["models"][0]
    prompts, source = questions(args.requests)
    before = info["batches"]
    load_before = os.getloadavg()[0]
    latencies, tokens, wall = asyncio.run(
        load(base_url, args.api_key, model, prompts, args.concurrency, args.max_tokens, args.temperature)
    )
    after = health(base_url)["batches"]
    load_after = os.getloadavg()[0]
    jobs = (after["completed"] + after["cancelled"] + after["failed"]) - (before["completed"] + before["cancelled"] + before["failed"])
    calls = after["generate_calls"] - before["generate_calls"]
    return {
        "server": {key: info.get(key) for key in ("device", "dtype", "max_model_len", "versions")},
        "client_versions": {"openai": metadata.version("openai"), "python": sys.version.split()[0]},
        # Other work on the machine slows a CPU server down: the 1-minute load average, before and after.
        "client_host_load_average_1m": [round(load_before, 2), round(load_after, 2)],
        "settings": {
            "model": model, "requests": len(prompts), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "prompts": source, "server_overrides": args.start,
        },
        "results": {
            "wall_s": round(wall, 3),
            "requests_per_s": round(len(prompts) / wall, 3),
            "latency_p50_s": round(percentile(latencies, 0.50), 3),
            "latency_p99_s": round(percentile(latencies, 0.99), 3),
            "generated_tokens": sum(tokens),
            "generated_tokens_per_s": round(sum(tokens) / wall, 1),
            "generate_calls": calls,
            "mean_batch_size": round(jobs / calls, 2) if calls else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--start", help="overrides for a server to start here, e.g. 'device=cpu serve.max_batch_size=8'")
    parser.add_argument("--model", help="model id (default: the server's base model)")
    parser.add_argument("--api-key", default="-", help="the server's serve.api_key, if it has one")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    args = parser.parse_args()

    if args.start is not None:
        with ServerProcess(*shlex.split(args.start), cwd=str(REPO)) as server:
            record = run(args, server.base_url)
    else:
        record = run(args, args.base_url.rstrip("/"))
    results_io.write(record, "serve_load", record["server"]["device"], args.tag, timestamp=True)


if __name__ == "__main__":
    main()
