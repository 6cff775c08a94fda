"""Padding-free packing for SFT: many short samples in one micro-batch, attention kept per sample.

``train.packing=true`` bins the tokenized training samples into packs of at most ``train.max_length``
tokens (:func:`plan_packs`), stores each pack as one dataset row holding its samples
(:func:`pack_dataset`), and flattens a micro-batch of packs into a single ``[1, tokens]`` row with
transformers' ``DataCollatorWithFlattening`` (:class:`PackedCollator`). That collator restarts
``position_ids`` at 0 for every sample, sets the first label of each sample to -100 (so no token
is predicted across a boundary), returns no ``attention_mask`` and, for sdpa and flash attention,
adds cumulative sequence lengths (``cu_seq_lens_q/k``). How attention stays within each sample is
the model's side (:mod:`npu_recipes.model.attention`); see docs/packing.md.

The loss keeps its meaning: transformers' causal-LM loss sums token cross-entropy over labelled
(assistant) tokens and divides by the Trainer's ``num_items_in_batch``, the count of labelled
tokens over all micro-batches of one optimizer step, with or without packing.
"""

from __future__ import annotations

import bisect
from typing import Any, Dict, List, Sequence, Tuple


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


def training_inputs(train_dataset, tokenizer, *, packing: bool, max_length: int, return_flash_attn_kwargs: bool,
                    ignore_index: int):
    """The train stage's data hook: the training dataset and collator for ``train.packing``.

    Args:
        return_flash_attn_kwargs: add ``cu_seq_lens_q/k`` and ``max_length_q/k`` to packed batches
            (for attention that reads them, :func:`npu_recipes.model.attention.packed_attention`).

    Returns:
        ``(train_dataset, data_collator, stats)``; unpacked: the dataset unchanged, a padding
        ``DataCollatorForSeq2Seq`` (labels padded with ``ignore_index``) and ``None``; packed: the
        packed dataset, a :class:`PackedCollator` and :func:`pack_dataset`'s stats.
    """
    from transformers import DataCollatorForSeq2Seq

    pad_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=ignore_index)
    if not packing:
        return train_dataset, pad_collator, None
    packed, stats = pack_dataset(train_dataset, max_length)
    return packed, PackedCollator(pad_collator, return_flash_attn_kwargs=return_flash_attn_kwargs), stats



def longest_row(train_dataset) -> int:
    """Tokens in the longest row of a training dataset from :func:`training_inputs`: the longest
    sample, or with packing the fullest pack (what one micro-batch row holds at most, which the
    memory plan sizes activations by)."""
    rows = train_dataset["input_ids"][:]
    return max((sum(len(sample) for sample in row) if row and isinstance(row[0], list) else len(row) for row in rows), default=0)
