"""The attention a training run picks per device, and the implementations npu_recipes registers.

The device paths (CUDA's varlen kernels, the NPU's npu_fusion_attention) run the same packed-equals-
unpacked test as the CPU, skipped where their device is missing; bench/device_check.sh runs them.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from npu_recipes.data import packing
from npu_recipes.model import attention
from npu_recipes.model.attention import NPU_FLASH, SDPA, TORCH_VARLEN, choose

D, H, L = packing.DEVICE, packing.HOST_LISTS, packing.HOST_TENSORS


@pytest.mark.parametrize("requested,device,packed,flash_attn,varlen,expected", [
    ("auto", "cpu", False, False, False, ("sdpa", SDPA, None)),
    ("auto", "cuda", False, True, True, ("sdpa", SDPA, None)),
    ("auto", "npu", False, False, False, ("sdpa", SDPA, None)),
    ("auto", "cpu", True, False, False, ("sdpa", SDPA, H)),
    ("auto", "npu", True, False, False, ("flash_attention_2", NPU_FLASH, L)),
    ("auto", "cuda", True, True, True, ("flash_attention_2", "flash_attention_2", D)),
    ("auto", "cuda", True, False, True, ("sdpa", TORCH_VARLEN, D)),
    ("auto", "cuda", True, False, False, ("sdpa", SDPA, H)),
    ("sdpa", "cuda", True, True, True, ("sdpa", SDPA, H)),
    ("flash_attention_2", "npu", True, False, False, ("flash_attention_2", NPU_FLASH, L)),
    ("flash_attention_2", "cuda", True, True, True, ("flash_attention_2", "flash_attention_2", D)),
    ("flash_attention_3", "cuda", True, False, True, ("flash_attention_3", "flash_attention_3", D)),
    ("eager", "cpu", True, False, False, ("eager", "eager", None)),
    ("flex_attention", "cuda", True, True, True, ("flex_attention", "flex_attention", None)),
    ("eager", "cpu", False, False, False, ("eager", "eager", None)),
])
def test_choice_per_device(requested, device, packed, flash_attn, varlen, expected):
    chosen = choose(requested, device, packed, flash_attn=flash_attn, varlen=varlen)
    assert (chosen.load_as, chosen.train_as, chosen.cu_seq_lens) == expected and chosen.reason


def test_generating_processes_load_auto_as_sdpa():
    assert attention.for_generation("auto") == "sdpa" and attention.for_generation("eager") == "eager"


def test_host_lengths_become_cpu_tensors_only_for_kernels_that_read_them_on_the_host():
    batch = {"input_ids": torch.ones(1, 5, dtype=torch.long), "cu_seq_lens_q": [0, 2, 5], "cu_seq_lens_k": [0, 2, 5]}
    converted = attention.forward_inputs(batch, L)
    assert converted["cu_seq_lens_q"].dtype == torch.int32 and converted["cu_seq_lens_q"].device.type == "cpu"
    assert converted["cu_seq_lens_k"].tolist() == [0, 2, 5] and batch["cu_seq_lens_q"] == [0, 2, 5]
    assert attention.forward_inputs(batch, H) is batch


def _sdpa_per_sample(q, k, v, cu_q, causal, scale):
    """A reference varlen kernel: causal SDPA per sample on ``[tokens, heads, head_dim]`` tensors."""
    bounds = cu_q.tolist()
    outputs = []
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if ks.shape[0] != qs.shape[0]:
            ks, vs = ks.repeat_interleave(qs.shape[0] // ks.shape[0], 0), vs.repeat_interleave(qs.shape[0] // vs.shape[0], 0)
        outputs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale).transpose(0, 1))
    return torch.cat(outputs)


def varlen_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None, scale=None):
    assert key.shape[1] == query.shape[1], "this signature has no enable_gqa: heads must be repeated"
    return _sdpa_per_sample(query, key, value, cu_seq_q, is_causal, scale)


def varlen_torch_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa == (key.shape[1] != query.shape[1])
    return _sdpa_per_sample(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale)


def varlen_window_without_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    assert key.shape[1] == query.shape[1]
    return _sdpa_per_sample(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), scale)


@pytest.fixture(scope="module")
def attention_layer(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    layer = model.model.layers[0].self_attn
    assert layer.config.num_attention_heads != layer.config.num_key_value_heads, "the tiny model must use grouped-query attention"
    return layer


@pytest.mark.parametrize("kernel", [varlen_torch_2_10, varlen_torch_2_13, varlen_window_without_gqa])
def test_varlen_attention_adapts_to_each_signature_and_matches_sdpa_per_sample(attention_layer, kernel):
    config = attention_layer.config
    head_dim = config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    tokens, lengths = 23, [7, 11, 5]
    query = torch.randn(1, config.num_attention_heads, tokens, head_dim, generator=generator)
    key, value = (torch.randn(1, config.num_key_value_heads, tokens, head_dim, generator=generator) for _ in range(2))
    cumulative = [0, 7, 18, 23]
    function = attention.make_varlen_attention(kernel)
    out, _ = function(attention_layer, query, key, value, None, scaling=attention_layer.scaling,
                      cu_seq_lens_q=torch.tensor(cumulative, dtype=torch.int32), max_length_q=max(lengths))
    expected, _ = attention.sdpa_by_sample(attention_layer, query, key, value, None, scaling=attention_layer.scaling,
                                           cu_seq_lens_q=cumulative)
    assert out.shape == (1, tokens, config.num_attention_heads, head_dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_a_varlen_signature_without_a_causal_switch_is_refused():
    with pytest.raises(TypeError, match="neither is_causal nor window_size"):
        attention.varlen_call(lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: None)


def _device_paths():
    cuda = torch.cuda.is_available()
    npu = importlib.util.find_spec("torch_npu") is not None
    flash = importlib.util.find_spec("flash_attn") is not None
    return [
        pytest.param("cpu", torch.float32, {}, 1e-4, id="cpu-sdpa"),
        pytest.param("cuda", torch.bfloat16, {"flash_attn": False, "varlen": True}, 1e-3, id="cuda-torch-varlen",
                     marks=pytest.mark.skipif(not cuda or attention.torch_varlen() is None, reason="needs CUDA and torch's varlen_attn")),
        pytest.param("cuda", torch.bfloat16, {"flash_attn": True}, 1e-3, id="cuda-flash-attn",
                     marks=pytest.mark.skipif(not (cuda and flash), reason="needs CUDA and the flash-attn package")),
        pytest.param("cuda", torch.bfloat16, {"flash_attn": False, "varlen": False}, 1e-3, id="cuda-sdpa",
                     marks=pytest.mark.skipif(not cuda, reason="needs CUDA")),
        pytest.param("npu", torch.bfloat16, {}, 1e-3, id="npu-flash",
                     marks=pytest.mark.skipif(not npu, reason="needs an Ascend NPU with torch_npu")),
    ]


@pytest.mark.parametrize("device,dtype,available,tolerance", _device_paths())
def test_packed_per_token_loss_equals_each_sample_alone(tiny_model_path, device, dtype, available, tolerance):
    """The attention ``auto`` picks for packing on ``device`` gives every token of a packed row the loss it
    has when its sample runs alone (per token within 1e-4 in fp32 on the CPU, 1e-3 in bf16 on a device)."""
    from transformers import AutoModelForCausalLM

    if device == "npu":
        import torch_npu  # noqa: F401  (torch's backend autoload is off: npu_recipes/__init__.py)
    chosen = choose("auto", device, packing=True, **available)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=dtype, attn_implementation=chosen.load_as).to(device)
    model.config.use_cache = False
    attention.adapt_model(model, chosen)
    generator = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, 700, (length,), generator=generator).tolist() for length in (37, 5, 64, 18)]
    collator = packing.PackedCollator(pad_collator=None, cu_seq_lens=chosen.cu_seq_lens)
    batch = collator([{"input_ids": samples, "labels": samples}])
    inputs = attention.forward_inputs({k: v for k, v in batch.items() if k != packing.SAMPLE_LENGTHS}, chosen.cu_seq_lens)
    # As the Trainer moves a batch: every tensor to the device (host lists, and the CPU tensors made from them after, stay).
    host_side = ("cu_seq_lens_q", "cu_seq_lens_k") if chosen.cu_seq_lens == packing.HOST_TENSORS else ()
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) and k not in host_side else v for k, v in inputs.items()}
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0].float()
        start = 0
        for sample in samples:
            alone = model(input_ids=torch.tensor([sample], device=device)).logits[0].float()
            torch.testing.assert_close(packed_logits[start:start + len(sample)].log_softmax(-1), alone.log_softmax(-1),
                                       atol=tolerance * 10, rtol=0)
            token_losses = torch.nn.functional.cross_entropy(alone[:-1], torch.tensor(sample[1:], device=device), reduction="none")
            packed_losses = torch.nn.functional.cross_entropy(packed_logits[start:start + len(sample) - 1],
                                                              torch.tensor(sample[1:], device=device), reduction="none")
            torch.testing.assert_close(packed_losses, token_losses, atol=tolerance, rtol=0)
            start += len(sample)
