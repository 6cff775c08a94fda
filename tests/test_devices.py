"""What a Device answers about its chip, and the dtype a run picks from it (no accelerator needed)."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from npu_recipes.config.schema import ModelConfig
from npu_recipes.model import pretrained
from npu_recipes.runtime.devices import Device


def _npu_reporting(monkeypatch, bf16: bool):
    """torch.npu as torch_npu provides it, reduced to what these tests read."""
    fake = types.SimpleNamespace(is_bf16_supported=lambda: bf16, get_device_name=lambda index: "Ascend910A" if not bf16 else "Ascend910B3")
    monkeypatch.setattr(torch, "npu", fake, raising=False)


@pytest.mark.parametrize("bf16", [True, False])
def test_npu_bf16_support_is_asked_of_torch_npu(monkeypatch, bf16):
    _npu_reporting(monkeypatch, bf16)
    assert Device("npu", 8).supports_bf16() is bf16
    assert Device("cpu", 1).supports_bf16() is True


def test_auto_dtype_falls_back_to_fp16_where_bf16_is_unsupported_and_says_why(monkeypatch, caplog):
    _npu_reporting(monkeypatch, bf16=False)
    monkeypatch.setattr(pretrained, "checkpoint_dtype", lambda model, path: torch.bfloat16)
    model = ModelConfig(name_or_path="unused")
    with caplog.at_level(logging.WARNING, logger="npu_recipes.model.pretrained"):
        choice = pretrained.dtype_choice(model, "unused", Device("npu", 8))
    assert choice.dtype == torch.float16
    assert choice.fallback == "Ascend910A does not support bf16 (the checkpoint's dtype): weights and compute in fp16"
    assert "model.torch_dtype=float32" in caplog.text
    # An explicit dtype is never second-guessed, and a chip with bf16 keeps the checkpoint's.
    assert pretrained.dtype_choice(ModelConfig(name_or_path="unused", torch_dtype="bfloat16"), "unused", Device("npu", 8)) == (torch.bfloat16, None)
    _npu_reporting(monkeypatch, bf16=True)
    assert pretrained.dtype_choice(model, "unused", Device("npu", 8)) == (torch.bfloat16, None)
