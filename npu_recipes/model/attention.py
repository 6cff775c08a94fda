"""Which attention a model trains with, per device, and the attention functions npu_recipes registers.

A packed micro-batch is one row of many samples whose ``position_ids`` restart at 0 per sample
(:mod:`npu_recipes.data.packing`). Attention must stay within each sample, and on an accelerator
it should take one kernel call per layer and never make the host wait for the device.
``model.attn_implementation=auto`` (the default) picks, through :func:`choose`:

* NPU, packing: transformers' ``flash_attention_2`` integration, which calls torch_npu's
  ``npu_fusion_attention`` (TND layout, ``sparse_mode=3``), as :data:`NPU_FLASH`: the cumulative
  sequence lengths reach it as host (CPU) tensors, so its ``cu_seqlens[1:].cpu()`` copies nothing
  from the device (two host syncs per layer otherwise);
* CUDA, packing: flash-attn's varlen kernel when the flash-attn package is installed; otherwise
  PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (the built-in FlashAttention kernels, one
  call per layer on device-side ``cu_seq_lens``, nothing to compile) as :data:`TORCH_VARLEN`;
  :data:`SDPA` only where neither exists;
* CPU, packing, and every device without packing: :data:`SDPA`, torch's fused attention, once per
  packed sample (split with ``torch.split`` on host-side lengths) or once per micro-batch.

npu_recipes' implementations are registered with transformers' ``AttentionInterface`` only, never
with its ``AttentionMaskInterface``: transformers then builds no mask for them (its mask preparation
reads device values, the packed-sequence check and SDPA's causal-skip check, each a host sync per
forward). They need none: packed samples are split by their lengths, and training rows are padded on
the right, so plain causal attention never lets a real token see a padding token.

An explicit ``model.attn_implementation`` is honoured (``eager`` and ``flex_attention`` keep packed
samples apart with transformers' mask from the position ids). See docs/packing.md.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any, Callable, Dict, List, NamedTuple, Optional

from npu_recipes.data.packing import DEVICE, HOST_LISTS, HOST_TENSORS

AUTO = "auto"

SDPA = "npu_recipes_sdpa"
"""Causal SDPA once per packed sample, or once per micro-batch (:func:`sdpa_by_sample`)."""

TORCH_VARLEN = "npu_recipes_torch_varlen"
"""``torch.nn.attention.varlen.varlen_attn`` over device-side ``cu_seq_lens`` (:func:`make_varlen_attention`)."""

NPU_FLASH = "npu_recipes_npu_flash"
"""transformers' flash-attention integration (torch_npu's ``npu_fusion_attention`` on an NPU), fed host-side lengths."""



class AttentionChoice(NamedTuple):
    """What a training run uses.

    Attributes:
        load_as: the ``attn_implementation`` given to ``from_pretrained``.
        train_as: the implementation training runs (the model is switched to it after loading).
        cu_seq_lens: how packed batches carry their cumulative lengths (``DEVICE``, ``HOST_LISTS`` or
            ``HOST_TENSORS`` of :mod:`npu_recipes.data.packing`), or None when the implementation does
            not read them (its mask comes from the position ids).
        reason: one line saying why (logged, and recorded in the manifest).
    """

    load_as: str
    train_as: str
    cu_seq_lens: Optional[str]
    reason: str


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen() -> Optional[Callable]:
    """``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10), or None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def choose(requested: str, device_type: str, packing: bool, *, flash_attn: Optional[bool] = None,
           varlen: Optional[bool] = None) -> AttentionChoice:
    """The attention of a training run on ``device_type`` (``npu``/``cuda``/``cpu``) for ``model.attn_implementation``.

    ``flash_attn`` / ``varlen`` say whether the flash-attn package / torch's ``varlen_attn`` exist
    (looked up when None). Whether the choice can run here is :func:`npu_recipes.model.kernels.check`'s.
    """
    if requested in (AUTO, "sdpa") and not packing:
        return AttentionChoice("sdpa", SDPA, None, "sdpa, one causal call per micro-batch (rows are not packed)")
    if not packing:
        return AttentionChoice(requested, requested, None, f"{requested} as configured")
    if requested == "sdpa" or (requested == AUTO and device_type == "cpu"):
        return AttentionChoice("sdpa", SDPA, HOST_LISTS, "packing: sdpa once per packed sample")
    if device_type == "npu" and requested in (AUTO, "flash_attention_2"):
        return AttentionChoice("flash_attention_2", NPU_FLASH, HOST_TENSORS,
                               "packing on an NPU: flash_attention_2 (torch_npu's npu_fusion_attention, TND layout) "
                               "with sequence lengths kept on the host")
    if requested == AUTO:  # CUDA
        if _flash_attn_installed() if flash_attn is None else flash_attn:
            return AttentionChoice("flash_attention_2", "flash_attention_2", DEVICE,
                                   "packing on CUDA: flash_attention_2 (the flash-attn package's varlen kernel)")
        if torch_varlen() is not None if varlen is None else varlen:
            return AttentionChoice("sdpa", TORCH_VARLEN, DEVICE,
                                   "packing on CUDA without flash-attn: torch.nn.attention.varlen.varlen_attn")
        return AttentionChoice("sdpa", SDPA, HOST_LISTS,
                               "packing on CUDA without flash-attn or torch's varlen_attn: sdpa once per packed sample")
    if requested in ("flash_attention_2", "flash_attention_3"):
        return AttentionChoice(requested, requested, DEVICE, f"{requested} as configured")
    return AttentionChoice(requested, requested, None, f"{requested} as configured: samples kept apart by the mask "
                           "transformers builds from the position ids")


def for_generation(requested: str) -> str:
    """The ``attn_implementation`` a generating or merging process loads with (``auto``: ``sdpa``)."""
    return "sdpa" if requested == AUTO else requested


def _split_lengths(cu_seq_lens: List[int]) -> List[int]:
    return [end - start for start, end in zip(cu_seq_lens, cu_seq_lens[1:])]


def sdpa_by_sample(module, query, key, value, attention_mask, **kwargs):
    """Causal SDPA over each packed sample, or over the whole micro-batch (transformers ``AttentionInterface`` signature).

    ``query``: ``[batch, heads, tokens, head_dim]``, ``key``/``value``: ``[batch, kv_heads, tokens, head_dim]``.
    A packed row (batch 1) carries its sample boundaries in ``cu_seq_lens_q`` as a host list, so no
    device value is read; samples are cut with ``torch.split``, whose backward concatenates the
    gradients (slicing would make each slice's backward allocate a full-size zero tensor and add
    them: 1,731 MiB of allocations against 300 MiB measured on the CPU, identical gradients). Exact,
    like a block-diagonal mask, but it costs the sum of squared sample lengths instead of the squared
    row length. Anything else is one causal SDPA call: rows are padded on the right, so no real
    token attends to a padding token (``attention_mask`` is None: no mask is registered for this
    implementation; a mask a caller passes anyway is honoured).

    Returns:
        ``(attn_output [batch, tokens, heads, head_dim], None)``.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    rest = _without_lengths(kwargs)
    if attention_mask is not None or not isinstance(cu_seq_lens, list) or len(cu_seq_lens) <= 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **rest)
    if query.shape[0] != 1:
        raise ValueError(f"packed rows must come one per micro-batch (batch of 1), got a batch of {query.shape[0]}")
    lengths = _split_lengths(cu_seq_lens)
    outputs = [
        sdpa_attention_forward(module, q, k, v, None, **rest)[0]
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    return torch.cat(outputs, dim=1), None


def npu_flash_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' flash-attention function (on an NPU: torch_npu's ``npu_fusion_attention``, TND layout
    over ``cu_seq_lens_q/k``), registered under :data:`NPU_FLASH` so that transformers prepares no mask
    (see the module docstring). ``cu_seq_lens_q/k`` are CPU tensors (:func:`forward_inputs`)."""
    from transformers.integrations.flash_attention import flash_attention_forward

    return flash_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _without_lengths(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}


class VarlenCall(NamedTuple):
    """How to call the installed ``varlen_attn`` causally: by ``is_causal=True`` (its first signature) or
    ``window_size=(-1, 0)`` (later ones), and whether it takes ``enable_gqa`` and ``scale``."""

    causal_keyword: str
    enable_gqa: bool
    scale: bool


def varlen_call(function: Callable) -> VarlenCall:
    """Read ``function``'s signature once (torch 2.10's ``varlen_attn`` took ``is_causal``; later
    releases took ``window_size`` and ``enable_gqa`` instead).

    Raises:
        TypeError: the signature has neither ``is_causal`` nor ``window_size``.
    """
    parameters = inspect.signature(function).parameters
    if "is_causal" in parameters:
        causal = "is_causal"
    elif "window_size" in parameters:
        causal = "window_size"
    else:
        raise TypeError(f"{function.__qualname__} takes neither is_causal nor window_size: cannot ask it for causal attention")
    return VarlenCall(causal, "enable_gqa" in parameters, "scale" in parameters)


def make_varlen_attention(function: Callable) -> Callable:
    """A transformers attention function over ``function`` (``varlen_attn``'s signature), adapted to it once.

    ``query``: ``[1, heads, tokens, head_dim]``, ``key``/``value``: ``[1, kv_heads, tokens, head_dim]``;
    ``cu_seq_lens_q/k``: int32 device tensors ``[samples + 1]``; ``max_length_q/k``: ints. K/V heads are
    repeated for grouped-query attention where ``enable_gqa`` is missing. Rows without lengths or with
    a mask go to transformers' SDPA (one causal call, as in :func:`sdpa_by_sample`). Returns
    ``(attn_output [1, tokens, heads, head_dim], None)``.
    """
    call = varlen_call(function)

    def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        cu_seq_lens = kwargs.get("cu_seq_lens_q")
        if attention_mask is not None or cu_seq_lens is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                          **_without_lengths(kwargs))
        q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # [tokens, heads, head_dim]
        options: Dict[str, Any] = {"is_causal": True} if call.causal_keyword == "is_causal" else {"window_size": (-1, 0)}
        if k.shape[1] != q.shape[1]:
            if call.enable_gqa:
                options["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if call.scale and scaling is not None:
            options["scale"] = scaling
        output = function(q, k, v, cu_seq_lens, kwargs.get("cu_seq_lens_k", cu_seq_lens), kwargs["max_length_q"],
                          kwargs.get("max_length_k", kwargs["max_length_q"]), **options)
        return output.unsqueeze(0), None

    return varlen_attention


def adapt_model(model, choice: AttentionChoice) -> None:
    """Switch a model loaded with ``choice.load_as`` to ``choice.train_as``, registering npu_recipes'
    implementations with transformers on first use (attention function only, no mask function).

    transformers does not serialize the attention implementation into ``config.json``, so saved
    checkpoints load with the default implementation as before.
    """
    if choice.train_as == choice.load_as:
        return
    from transformers import AttentionInterface

    functions = {SDPA: lambda: sdpa_by_sample, NPU_FLASH: lambda: npu_flash_attention,
                 TORCH_VARLEN: lambda: make_varlen_attention(torch_varlen())}
    AttentionInterface.register(choice.train_as, functions[choice.train_as]())
    model.set_attn_implementation(choice.train_as)


def forward_inputs(inputs: Dict[str, Any], cu_seq_lens: Optional[str]) -> Dict[str, Any]:
    """A packed batch as the model's forward takes it: with :data:`HOST_TENSORS`, the host lists of
    ``cu_seq_lens_q/k`` become int32 CPU tensors (transformers' NPU flash path reads them with
    ``.cpu()``, a no-op on these, where device tensors would cost two host syncs per layer)."""
    if cu_seq_lens != HOST_TENSORS or not isinstance(inputs.get("cu_seq_lens_q"), list):
        return inputs
    import torch

    converted = dict(inputs)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        converted[key] = torch.tensor(inputs[key], dtype=torch.int32)
    return converted
