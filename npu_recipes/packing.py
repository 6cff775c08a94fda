"""Padding-free packing for SFT: many short samples in one micro-batch, attention kept per sample.

``train.packing=true`` bins the tokenized training samples into packs of at most ``train.max_length``
tokens (:func:`plan_packs`), stores each pack as one dataset row holding its samples
(:func:`pack_dataset`), and flattens a micro-batch of packs into a single ``[1, tokens]`` row with
transformers' ``DataCollatorWithFlattening`` (:class:`PackedCollator`). That collator restarts
``position_ids`` at 0 for every sample, sets the first label of each sample to -100 (so no token
is predicted across a boundary), returns no ``attention_mask`` and, for sdpa and flash attention,
adds cumulative sequence lengths (``cu_seq_lens_q/k``). Attention then stays within each sample:

* ``sdpa``: the model is switched to :func:`per_sample_sdpa` (SDPA over each sample's slice);
* ``eager``: transformers 5 builds a block-diagonal causal mask from the position ids
  (``masking_utils.find_packed_sequence_indices``);
* ``flash_attention_2/3``: transformers' varlen kernels take ``cu_seq_lens`` (``flash_attn_varlen_func``
  on CUDA, ``torch_npu.npu_fusion_attention`` with the TND layout on Ascend).

See docs/packing.md.

The loss keeps its meaning: transformers' causal-LM loss sums token cross-entropy over labelled
(assistant) tokens and divides by the Trainer's ``num_items_in_batch``, the count of labelled
tokens over all micro-batches of one optimizer step, with or without packing.
"""

from __future__ import annotations

import bisect
from typing import Any, Dict, List, Sequence, Tuple

from npu_recipes.errors import UserError

MASK_FROM_POSITION_IDS = ("sdpa", "eager")
"""Attention implementations for which transformers itself derives a per-sample mask from position ids."""

VARLEN = ("flash_attention_2", "flash_attention_3")
"""Attention implementations that take cumulative sequence lengths (``cu_seq_lens_q/k``) directly."""

SUPPORTED_ATTENTION = MASK_FROM_POSITION_IDS + VARLEN
"""``model.attn_implementation`` values that keep packed samples apart (checked by config.validate)."""


def check_attention(attn_implementation: str) -> None:
    """Fail when ``train.packing=true`` meets an attention implementation not known to keep samples apart.

    Raises:
        UserError: names ``model.attn_implementation`` and the supported values.
    """
    if attn_implementation not in SUPPORTED_ATTENTION:
        raise UserError(
            f"train.packing=true needs an attention implementation that keeps packed samples apart; "
            f"model.attn_implementation={attn_implementation!r} is not one of {', '.join(SUPPORTED_ATTENTION)}",
            fix="pass model.attn_implementation=sdpa (or flash_attention_2 on CUDA/Ascend), or train.packing=false",
        )


def plan_packs(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Group sample indices into packs of at most ``capacity`` tokens (best-fit decreasing).

    Samples are placed longest first, each into the open pack with the least room that still fits it,
    or into a new pack. Best-fit decreasing needs asymptotically at most 11/9 of the optimal number
    of packs (D. S. Johnson, "Near-optimal bin packing algorithms", MIT thesis, 1973); with many
    short samples it fills packs almost completely. The result depends only on ``lengths`` and
    ``capacity`` (ties broken by index), so every rank computes the same packs.

    Args:
        lengths: tokens per sample.
        capacity: most tokens per pack (``train.max_length``).

    Returns:
        Packs as lists of sample indices; every index appears in exactly one pack.

    Raises:
        ValueError: a sample is empty or longer than ``capacity`` (the data pipeline drops or
            truncates those before packing, so this means a caller skipped it).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    open_packs: List[Tuple[int, int]] = []  # (room left, pack index), kept sorted
    packs: List[List[int]] = []
    for index in order:
        length = lengths[index]
        if not 0 < length <= capacity:
            raise ValueError(f"sample {index} has {length} tokens; packs hold 1 to {capacity}")
        slot = bisect.bisect_left(open_packs, (length, -1))
        if slot == len(open_packs):
            packs.append([index])
            room, pack = capacity - length, len(packs) - 1
        else:
            room, pack = open_packs.pop(slot)
            packs[pack].append(index)
            room -= length
        if room > 0:
            bisect.insort(open_packs, (room, pack))
    return packs


def pack_dataset(dataset, capacity: int):
    """Turn a tokenized dataset (``input_ids``, ``labels`` per sample) into one row per pack.

    Each output row holds its samples unchanged as lists of lists:
    ``{"input_ids": [[...], [...]], "labels": [[...], [...]]}``, so :class:`PackedCollator` can
    flatten them with per-sample position ids. Other columns are dropped.

    Returns:
        ``(packed_dataset, stats)``; ``stats`` has ``samples``, ``packs``, ``tokens`` and ``fill``
        (tokens / (packs * capacity), the fraction of pack capacity used).
    """
    from datasets import Dataset

    input_ids = dataset["input_ids"][:]
    labels = dataset["labels"][:]
    packs = plan_packs([len(ids) for ids in input_ids], capacity)
    packed = Dataset.from_dict(
        {
            "input_ids": [[input_ids[i] for i in pack] for pack in packs],
            "labels": [[labels[i] for i in pack] for pack in packs],
        }
    )
    tokens = sum(len(ids) for ids in input_ids)
    stats = {
        "samples": len(input_ids),
        "packs": len(packs),
        "tokens": tokens,
        "fill": round(tokens / (len(packs) * capacity), 4) if packs else 0.0,
    }
    return packed, stats


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


class PackedCollator:
    """Collate packs into one padding-free row; collate plain samples (evaluation) by padding.

    A micro-batch of ``per_device_train_batch_size`` packs becomes one row of
    ``[1, total_tokens]`` ``input_ids``, ``labels`` and ``position_ids`` (int64), built by
    transformers' ``DataCollatorWithFlattening``; with ``return_flash_attn_kwargs`` it also
    carries ``cu_seq_lens_q/k`` (int32, ``[samples + 1]``) and ``max_length_q/k`` (int) for the
    varlen flash-attention kernels. Rows that are single samples (the unpacked evaluation split,
    so ``eval_loss`` is comparable with and without packing) go to ``pad_collator``.
    """

    def __init__(self, pad_collator, return_flash_attn_kwargs: bool = False):
        from transformers import DataCollatorWithFlattening

        self.pad_collator = pad_collator
        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=return_flash_attn_kwargs)

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not _is_pack(features[0]):
            return self.pad_collator(features)
        samples = [
            {"input_ids": ids, "labels": labels}
            for feature in features
            for ids, labels in zip(feature["input_ids"], feature["labels"])
        ]
        return self.flatten(samples)


def _is_pack(feature: Dict[str, Any]) -> bool:
    first = feature["input_ids"][0]
    return isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) == 1


def training_inputs(train_dataset, tokenizer, *, packing: bool, max_length: int, attn_implementation: str, ignore_index: int):
    """The train stage's data hook: the training dataset and collator for ``train.packing``.

    Returns:
        ``(train_dataset, data_collator, stats)``; unpacked: the dataset unchanged, a padding
        ``DataCollatorForSeq2Seq`` (labels padded with ``ignore_index``) and ``None``; packed: the
        packed dataset, a :class:`PackedCollator` and :func:`pack_dataset`'s stats plus
        ``attention``, the implementation :func:`adapt_model` will switch to.

    Raises:
        UserError: packing with an unsupported ``attn_implementation`` (:func:`check_attention`).
    """
    from transformers import DataCollatorForSeq2Seq

    pad_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=ignore_index)
    if not packing:
        return train_dataset, pad_collator, None
    check_attention(attn_implementation)
    packed, stats = pack_dataset(train_dataset, max_length)
    attention = PER_SAMPLE_SDPA if attn_implementation == "sdpa" else attn_implementation
    collator = PackedCollator(pad_collator, return_flash_attn_kwargs=attention in VARLEN + (PER_SAMPLE_SDPA,))
    return packed, collator, {**stats, "attention": attention}


def adapt_model(model, attn_implementation: str) -> None:
    """The train stage's model hook under packing: ``sdpa`` becomes :func:`per_sample_sdpa`; others stay.

    ``eager`` keeps transformers' block-diagonal mask (it exists for debugging); flash attention
    already runs per sample from ``cu_seq_lens``.
    """
    if attn_implementation == "sdpa":
        use_per_sample_sdpa(model)
