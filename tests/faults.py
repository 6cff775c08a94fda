"""Run the real CLI with one fault injected: ``python -m tests.faults FAULT [CLI overrides...]``.

Faults (each simulates what the machine would do, at the library call where it would happen):

* ``no-space-at-checkpoint=N``: every ``torch.save`` into ``checkpoint-N`` (optimizer, scheduler
  and RNG states) fails with ENOSPC, as on a disk that filled up while that checkpoint was written.
* ``out-of-memory-at-step=N``: the N-th training micro-step raises ``torch.OutOfMemoryError``
  with the CUDA allocator's wording, as a device with too little memory would.
* ``sigterm-in-slow-step=N``: the N-th training micro-step sends this process SIGTERM, then takes
  ten minutes (a step over a huge pack, or a hung collective): the stop must not wait for it.
"""

from __future__ import annotations

import errno
import sys


def _no_space_at_checkpoint(step: int) -> None:
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, str) and f"checkpoint-{step}/" in f:
            raise OSError(errno.ENOSPC, "No space left on device", f)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def _out_of_memory_at_step(step: int) -> None:
    import torch
    from transformers import Trainer

    real_step = Trainer.training_step
    calls = {"count": 0}

    def training_step(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == step:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 GiB (simulated)"
            )
        return real_step(self, *args, **kwargs)

    Trainer.training_step = training_step


def _sigterm_in_slow_step(step: int) -> None:
    import os
    import signal
    import time

    from transformers import Trainer

    real_step = Trainer.training_step
    calls = {"count": 0}

    def training_step(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(600)
        return real_step(self, *args, **kwargs)

    Trainer.training_step = training_step


FAULTS = {"no-space-at-checkpoint": _no_space_at_checkpoint, "out-of-memory-at-step": _out_of_memory_at_step,
          "sigterm-in-slow-step": _sigterm_in_slow_step}


def main() -> None:
    name, _, value = sys.argv[1].partition("=")
    FAULTS[name](int(value))
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    from npu_recipes.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
