"""Helpers for tests: paths, and running the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
GSM8K = SHARED / "data" / "gsm8k"
NPU_SMI_FIXTURES = SHARED / "fixtures" / "npu-smi"


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m npu_recipes ARGS`` as a user would; returns the completed process (text output).

    ``input`` is typed on its stdin (then end of input); without it stdin is empty.
    """
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "npu_recipes", *args],
        cwd=cwd or REPO,
        env=full_env,
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_faulty_cli(fault: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI with one fault injected by tests/faults.py (``no-space-at-checkpoint=N``,
    ``out-of-memory-at-step=N``); returns the completed process (text output)."""
    return subprocess.run([sys.executable, "-m", "tests.faults", fault, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_for_generation(config, device):
    """The model ``config`` names (``model.*`` or its ``adapters``' base, plus the adapters), loaded
    for generation on ``device`` as the infer and serve stages load it."""
    from npu_recipes.config import compose
    from npu_recipes.infer import adapters, loading

    parsed = adapters.parse_adapters(config.adapters)
    return loading.load(adapters.base_model_config(config.model, parsed, compose.command_line_keys()), parsed, device)


FIXED_PROMPTS = [
    [{"role": "user", "content": "Ava has 12 apples and gets 30 more. How many apples does Ava have now?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 * 8?"}],
]
"""The chat prompts :func:`fixed_batch_logits` runs."""


def fixed_batch_logits(*overrides: str):
    """Logits ``[2, tokens, vocab]`` of :data:`FIXED_PROMPTS` (left-padded) in fp32 on the CPU, padding
    positions zeroed, for the model ``overrides`` name (several adapters are stacked, as the infer stage
    applies them): merge tests compare these before and after a merge."""
    import torch

    from npu_recipes.config import compose
    from npu_recipes.infer import loading
    from npu_recipes.runtime import devices

    loaded = load_for_generation(compose.compose(["device=cpu", *overrides]), devices.resolve("cpu"))
    loading.stack_adapters(loaded)
    texts = [loaded.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in FIXED_PROMPTS]
    batch = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert loaded.model.dtype == torch.float32
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    return logits * batch["attention_mask"].unsqueeze(-1)


def run_in_process(*overrides: str) -> None:
    """Compose, validate and run a stage in this process, as the CLI does once it has parsed its
    arguments: for tests of what a stage produces. The CLI contract (exit status, the printed error
    block, a process per command) is tested through :func:`run_cli`.

    The run directory's lock is released afterwards, so a later command (in a subprocess, too) may
    continue the run, as it could after a CLI process had exited.

    Raises:
        What the stage raises: UserError for bad input, SystemExit where a stage exits with a status.
    """
    from npu_recipes import runner
    from npu_recipes.config import compose
    from npu_recipes.run import lock

    config = compose.compose(list(overrides))
    try:
        runner.run(config, fresh_output_dir=not any(o.startswith("output_dir=") for o in overrides))
    finally:
        lock.release(Path(config.output_dir).expanduser().absolute())
