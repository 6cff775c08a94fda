"""Attention over packed rows: which implementation a packed model runs, and the per-sample SDPA one.

A packed micro-batch is one row of many samples whose ``position_ids`` restart at 0 per sample
(:mod:`npu_recipes.data.packing`). Attention must stay within each sample:

* ``sdpa``: the model is switched to :func:`per_sample_sdpa` (SDPA over each sample's slice);
* ``eager``: transformers 5 builds a block-diagonal causal mask from the position ids
  (``masking_utils.find_packed_sequence_indices``);
* ``flash_attention_2/3``: transformers' varlen kernels take ``cu_seq_lens`` (``flash_attn_varlen_func``
  on CUDA, ``torch_npu.npu_fusion_attention`` with the TND layout on Ascend).

See docs/packing.md.
"""

from __future__ import annotations

from typing import Any, List, NamedTuple

VARLEN = ("flash_attention_2", "flash_attention_3")
"""Attention implementations that take cumulative sequence lengths (``cu_seq_lens_q/k``) directly."""


PER_SAMPLE_SDPA = "npu_recipes_sdpa_per_sample"
"""Attention implementation registered by :func:`use_per_sample_sdpa`: SDPA run once per packed sample."""


_last_bounds: List[Any] = [None, None]


def _sample_bounds(query, attention_mask, kwargs) -> List[int] | None:
    """Token offsets where the packed samples of a ``[1, heads, tokens, head_dim]`` row start (plus the end),
    or None for a row that is one sequence or carries its own mask."""
    if attention_mask is not None:
        return None
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is not None:
        # Every layer (and its recomputation) receives the same tensor; read it to the host once.
        if _last_bounds[0] is not cu_seq_lens:
            _last_bounds[:] = [cu_seq_lens, cu_seq_lens.tolist()]
        return _last_bounds[1]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    from transformers.masking_utils import find_packed_sequence_indices

    sample_index = find_packed_sequence_indices(position_ids)
    if sample_index is None:
        return None
    if query.shape[0] != 1:
        raise ValueError(f"packed rows must come one per micro-batch (batch of 1), got a batch of {query.shape[0]}")
    return [0] + sample_index[0].bincount().cumsum(0).tolist()


def per_sample_sdpa(module, query, key, value, attention_mask, **kwargs):
    """Causal SDPA over each packed sample separately (transformers ``AttentionInterface`` signature).

    ``query``: ``[1, heads, tokens, head_dim]``, ``key``/``value``: ``[1, kv_heads, tokens, head_dim]``.
    Sample boundaries come from ``cu_seq_lens_q`` or, failing that, from ``position_ids`` restarting
    (``transformers.masking_utils.find_packed_sequence_indices``). Exact, like the block-diagonal
    mask transformers builds for ``sdpa``, but costs the sum of squared sample lengths instead of
    the squared row length, and lets SDPA use its causal kernels. Rows that are not packed, or that
    carry a padding mask (evaluation batches), go to transformers' ``sdpa_attention_forward`` as is.

    Returns:
        ``(attn_output [1, tokens, heads, head_dim], None)``.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _sample_bounds(query, attention_mask, kwargs)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rest = {k: v for k, v in kwargs.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}
    outputs = [
        sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **rest)[0]
        for s, e in zip(bounds, bounds[1:])
    ]
    return torch.cat(outputs, dim=1), None


def _per_sample_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No mask for unpadded rows (:func:`per_sample_sdpa` splits them); transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_per_sample_sdpa(model) -> None:
    """Switch a transformers model loaded with ``sdpa`` to :func:`per_sample_sdpa` (registered on first use).

    transformers does not serialize the attention implementation into ``config.json``, so saved
    checkpoints load with the default implementation as before.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PER_SAMPLE_SDPA, per_sample_sdpa)
    AttentionMaskInterface.register(PER_SAMPLE_SDPA, _per_sample_sdpa_mask)
    model.set_attn_implementation(PER_SAMPLE_SDPA)



class PackedAttention(NamedTuple):
    """How a model runs attention over packed rows: ``implementation`` (the name it is switched to)
    and whether it reads the collator's cumulative sequence lengths (``cu_seq_lens``)."""

    implementation: str
    reads_cu_seq_lens: bool


def packed_attention(attn_implementation: str) -> PackedAttention:
    """The :class:`PackedAttention` for a model loaded with ``attn_implementation`` (``model.attn_implementation``)."""
    implementation = PER_SAMPLE_SDPA if attn_implementation == "sdpa" else attn_implementation
    return PackedAttention(implementation, implementation in VARLEN + (PER_SAMPLE_SDPA,))


def adapt_model(model, attn_implementation: str) -> None:
    """The train stage's model hook under packing: ``sdpa`` becomes :func:`per_sample_sdpa`; others stay.

    ``eager`` keeps transformers' block-diagonal mask (it exists for debugging); flash attention
    already runs per sample from ``cu_seq_lens``.
    """
    if attn_implementation == "sdpa":
        use_per_sample_sdpa(model)

