"""``kernels=`` and ``model.attn_implementation``: clear failures where a kernel cannot run, the Qwen2
patch mechanism on the CPU, and the real fused kernels where an NPU or a CUDA GPU is present."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from npu_recipes.config import compose
from npu_recipes.errors import UserError
from npu_recipes.model import kernels
from npu_recipes.runtime.devices import Device
from tests.helpers import read_jsonl, run_cli, run_in_process

LIGER_MISSING = importlib.util.find_spec("liger_kernel") is None


KERNEL_MISTAKES = {
    "kernels=npu": "kernels=npu runs torch_npu's fused kernels on an Ascend NPU, but this run's device is cpu",
    "kernels=liger": ("needs the liger-kernel package, which is not installed" if LIGER_MISSING
                      else "kernels=liger runs Triton kernels on CUDA GPUs only, but this run's device is cpu"),
    "model.attn_implementation=flash_attention_2": "flash_attention_2 needs an NPU or a CUDA GPU, but this run's device is cpu",
}


@pytest.mark.slow
@pytest.mark.parametrize("override", sorted(KERNEL_MISTAKES))
def test_a_kernel_that_cannot_run_here_fails_clearly(tmp_path, override):
    """The train stage refuses, with a fix, before it loads a model; nothing of the run is left."""
    run = tmp_path / "run"
    with pytest.raises(UserError) as refused:
        run_in_process(override, "device=cpu", "train.max_steps=1", f"output_dir={run}")
    assert KERNEL_MISTAKES[override] in refused.value.message and refused.value.fix
    assert not run.exists()


@pytest.mark.cli
def test_a_kernel_mistake_is_one_error_block_through_the_cli(tmp_path):
    run = tmp_path / "run"
    result = run_cli("kernels=npu", "device=cpu", "train.max_steps=1", f"output_dir={run}")
    assert result.returncode == 2
    assert KERNEL_MISTAKES["kernels=npu"] in result.stderr and "fix:" in result.stderr
    assert result.stderr.count("npu_recipes: error:") == 1 and "Traceback" not in result.stderr
    assert not run.exists()


def test_an_unknown_kernel_choice_names_the_valid_ones():
    with pytest.raises(UserError, match="kernels='fused' is not valid"):
        compose.compose(["kernels=fused", "device=cpu"])


def _reference_ops() -> kernels.FusedOps:
    """torch_npu's three operations as their documented formulas, plus torch's own fused rms_norm kernel;
    they let the patch run on the CPU, so what is tested here is the patch's wiring, not torch_npu."""

    def rotary_mul(x, cos, sin):
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-second, first), dim=-1) * sin

    def swiglu(x):
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    return kernels.FusedOps(
        rms_norm=lambda x, weight, eps: torch.nn.functional.rms_norm(x, weight.shape, weight, eps),
        rotary_mul=rotary_mul,
        swiglu=swiglu,
    )


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_patched_qwen2_gives_the_same_loss_and_gradients(tiny_model_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", modeling_qwen2.apply_rotary_pos_emb)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 700, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    batch["attention_mask"][1, 17:] = 0
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    # 2 layers x (2 norms + 1 MLP) + the final norm + the rotary function.
    assert kernels.patch_model(model, _reference_ops()) == 8
    assert modeling_qwen2.apply_rotary_pos_emb.__module__ == kernels.__name__
    patched_loss, patched_grads = _loss_and_grads(model, batch)
    assert patched_loss == pytest.approx(plain_loss, rel=1e-5)
    assert patched_grads.keys() == plain_grads.keys() and len(plain_grads) == 28
    for name, grad in plain_grads.items():
        torch.testing.assert_close(patched_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_patch_refuses_other_architectures():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(Exception, match="kernels=npu has fused kernels for qwen2 models; this model is 'llama'"):
        kernels.patch_model(model, _reference_ops())


def test_auto_patches_qwen2_training_on_an_npu_only(tiny_model_path, monkeypatch):
    """kernels=auto: the fused kernels for a Qwen2 model training on an NPU; nothing on other devices or for
    other architectures (where kernels=npu would refuse)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", modeling_qwen2.apply_rotary_pos_emb)
    monkeypatch.setattr(kernels, "npu_ops", _reference_ops)
    qwen2 = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    kernels.apply("auto", qwen2, "cpu")
    assert modeling_qwen2.apply_rotary_pos_emb.__module__ != kernels.__name__
    kernels.apply("auto", qwen2, "npu")
    assert modeling_qwen2.apply_rotary_pos_emb.__module__ == kernels.__name__
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert not kernels.patchable(llama) and kernels.patchable(qwen2)
    kernels.apply("auto", llama, "npu")  # left as it is, no error
    assert compose.compose(["device=cpu"]).kernels == "auto"


def test_liger_goes_through_transformers_switch():
    assert kernels.training_arguments("liger") == {"use_liger_kernel": True, "liger_kernel_config": kernels.LIGER_KERNEL_CONFIG}
    assert kernels.training_arguments("none") == {} and kernels.training_arguments("npu") == {}


def _first_losses(tmp_path, name, *overrides):
    run = tmp_path / name
    result = run_cli("train.max_steps=3", "train.logging_steps=1", "train.gradient_accumulation_steps=1",
                     "dataset.val_split_ratio=0", "model.torch_dtype=float32", f"output_dir={run}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return [r["loss"] for r in read_jsonl(run / "logging.jsonl") if r["type"] == "train"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is None, reason="needs an Ascend NPU with torch_npu")
def test_npu_fused_kernels_match_unpatched_losses(tmp_path):
    assert _first_losses(tmp_path, "fused", "device=npu", "kernels=npu") == pytest.approx(
        _first_losses(tmp_path, "plain", "device=npu", "kernels=none"), rel=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(LIGER_MISSING or not torch.cuda.is_available(), reason="needs a CUDA GPU and liger-kernel")
def test_liger_kernels_match_unpatched_losses(tmp_path):
    assert _first_losses(tmp_path, "fused", "device=cuda", "kernels=liger") == pytest.approx(
        _first_losses(tmp_path, "plain", "device=cuda", "kernels=none"), rel=1e-3)


def test_flash_attention_3_on_an_npu_is_refused_with_the_choice_that_works():
    with pytest.raises(UserError, match="flash_attention_3 has no Ascend kernel") as refused:
        kernels.check("auto", "flash_attention_3", Device("npu", 8))
    assert "model.attn_implementation=auto" in refused.value.fix
    kernels.check("auto", "auto", Device("npu", 8))


@pytest.mark.parametrize(("attention", "device", "message"), [
    ("flash_attention_3", "cpu", "needs a CUDA GPU with the flash-attn-3 package"),
    ("flex_attention", "cpu", "no CPU backward"),
])
def test_attention_that_cannot_train_on_this_device_is_refused_before_loading(attention, device, message):
    with pytest.raises(UserError, match=message):
        kernels.check("auto", attention, Device(device, 1))


@pytest.mark.parametrize(("optim", "device", "message"), [
    ("adamw_torch_npu_fused", "cpu", "torch_npu's fused AdamW, but this run's device is cpu"),
    ("paged_adamw_8bit", "cpu", "needs the bitsandbytes package"),
    ("galore_adamw", "cuda", "needs the galore-torch package"),
])
def test_an_optimizer_that_cannot_be_built_here_is_refused_before_loading(optim, device, message):
    missing = {"bitsandbytes", "galore_torch"}
    assert all(importlib.util.find_spec(module) is None for module in missing), "the test needs these packages absent"
    with pytest.raises(UserError, match=message):
        kernels.check_optimizer(optim, Device(device, 1))
    kernels.check_optimizer("adamw_torch_fused", Device(device, 1))
    kernels.check_optimizer("adafactor", Device(device, 1))
