"""Shared fixtures: an isolated cache for built artefacts, and a helper that runs the real CLI."""

from __future__ import annotations

import os
import signal
from pathlib import Path

# huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported: set it before any test module
# imports it, or an in-process hub look-up retries its DNS failures for about 25 s before failing.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from tests.helpers import GSM8K, NPU_SMI_FIXTURES  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    """Build tiny_qwen2 and demo data into a per-session cache; keep HF datasets' cache there too."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["NPU_RECIPES_CACHE"] = str(cache / "npu_recipes")
    os.environ["HF_DATASETS_CACHE"] = str(cache / "hf_datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # One intra-op thread per CLI subprocess: the tiny model gains nothing from more, and on a
    # loaded 2-core machine torch's spinning threads made runs up to 13x slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    # The same for stages run in this process (tests.helpers.run_in_process), whose results tests
    # compare with runs of the CLI to the last bits: torch read OMP_NUM_THREADS when it was imported.
    import torch

    torch.set_num_threads(1)
    # Every process group of a test talks over the loopback interface, whatever this machine's
    # hostname resolves to (gloo otherwise binds the address of the hostname).
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    yield cache


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A stage run in this process (tests.helpers.run_in_process) installs its SIGTERM/SIGINT handlers;
    every test leaves the process with the handlers it found."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


@pytest.fixture(scope="session")
def tiny_model_path(isolated_caches) -> Path:
    """The tiny_qwen2 checkpoint directory, built once per session."""
    from npu_recipes.config.schema import ModelConfig
    from npu_recipes.model import pretrained

    path = Path(os.environ["NPU_RECIPES_CACHE"]) / "tiny_qwen2-v1"
    return Path(pretrained.resolve_path(ModelConfig(name_or_path=str(path), builder="tiny_qwen2")))


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """../shared/data/gsm8k (real third-party data); tests using it skip when it is absent."""
    if not (GSM8K / "train.jsonl").is_file():
        pytest.skip(f"GSM8K data not found at {GSM8K} (expected beside the project as ../shared/data/gsm8k)")
    return GSM8K


@pytest.fixture(scope="session")
def npu_smi_texts() -> dict:
    """The real 8 x 910B3 ``npu-smi info`` and ``npu-smi info -t topo`` outputs from ../shared/fixtures/npu-smi."""
    info, topo = NPU_SMI_FIXTURES / "info_8x910B3.txt", NPU_SMI_FIXTURES / "topo_8x910B3_hccs.txt"
    if not (info.is_file() and topo.is_file()):
        pytest.skip(f"npu-smi fixtures not found in {NPU_SMI_FIXTURES} (expected beside the project as ../shared/fixtures/npu-smi)")
    return {"info": info.read_text(), "topo": topo.read_text()}


# Hypothesis: 50 random examples per property in the full suite; 25 fixed ones (derandomized, the same
# in every run) in `make test-fast` (HYPOTHESIS_PROFILE=fast).
settings.register_profile("full", max_examples=50)
settings.register_profile("fast", max_examples=25, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "full"))
