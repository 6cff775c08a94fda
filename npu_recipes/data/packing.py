"""Padding-free packing for SFT: many short samples in one micro-batch, attention kept per sample.

``train.packing=true`` bins the tokenized training samples into packs of at most ``train.max_length``
tokens (:func:`plan_packs`), stores each pack as one dataset row holding its samples
(:func:`pack_dataset`), and flattens a micro-batch of packs into a single ``[1, tokens]`` row with
transformers' ``DataCollatorWithFlattening`` (:class:`PackedCollator`). That collator restarts
``position_ids`` at 0 for every sample, sets the first label of each sample to -100 (so no token
is predicted across a boundary), returns no ``attention_mask`` and, for the attention implementations that read them, adds
cumulative sequence lengths (``cu_seq_lens_q/k``), as device tensors or host lists. How attention stays within each sample is
the model's side (:mod:`npu_recipes.model.attention`); see docs/packing.md.

The loss keeps its meaning: transformers' causal-LM loss sums token cross-entropy over labelled
(assistant) tokens and divides by the Trainer's ``num_items_in_batch``, the count of labelled
tokens over all micro-batches of one optimizer step, with or without packing.
"""

from __future__ import annotations

import bisect
from typing import Any, Dict, List, Optional, Sequence, Tuple


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


DEVICE, HOST_LISTS, HOST_TENSORS = "device", "host_lists", "host_tensors"
"""How packed batches carry ``cu_seq_lens_q/k`` (chosen per device by :mod:`npu_recipes.model.attention`):
int32 tensors the Trainer moves to the device; Python lists, read on the host; or lists the Trainer
turns into CPU tensors just before the forward, for kernels that read the lengths on the host."""

SAMPLE_LENGTHS = "sample_lengths"
"""Batch key of the tokens of each sample in a micro-batch (a list of ints, host-side): what the
Trainer's FLOPs and token counts read, so they never read a device tensor. Stripped before the
forward (``npu_recipes.train.trainer.RecipeTrainer.compute_loss``)."""


class PackedCollator:
    """Collate packs into one padding-free row; collate plain samples (evaluation, or unpacked training) by padding.

    A micro-batch of ``per_device_train_batch_size`` packs becomes one row of ``[1, total_tokens]``
    ``input_ids``, ``labels`` and ``position_ids`` (int64), built by transformers'
    ``DataCollatorWithFlattening``. ``cu_seq_lens`` says how the row carries its cumulative sequence
    lengths ``cu_seq_lens_q/k`` (``[samples + 1]``) with ``max_length_q/k`` (int): :data:`DEVICE`,
    int32 tensors; :data:`HOST_LISTS` or :data:`HOST_TENSORS`, Python lists (never moved to the
    device); None, not at all. Rows that are single samples go to ``pad_collator``; their
    ``attention_mask`` is dropped when nothing was padded (every row as long as the longest), so
    attention runs causal without reading a mask from the device. Every batch also carries
    :data:`SAMPLE_LENGTHS`.
    """

    def __init__(self, pad_collator, cu_seq_lens: Optional[str] = None):
        from transformers import DataCollatorWithFlattening

        self.pad_collator = pad_collator
        self.cu_seq_lens = cu_seq_lens
        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=cu_seq_lens == DEVICE)

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not _is_pack(features[0]):
            lengths = [len(feature["input_ids"]) for feature in features]
            batch = self.pad_collator(features)
            if len(set(lengths)) == 1:
                batch.pop("attention_mask", None)
            batch[SAMPLE_LENGTHS] = lengths
            return batch
        samples = [
            {"input_ids": ids, "labels": labels}
            for feature in features
            for ids, labels in zip(feature["input_ids"], feature["labels"])
        ]
        batch = self.flatten(samples)
        lengths = [len(sample["input_ids"]) for sample in samples]
        if self.cu_seq_lens in (HOST_LISTS, HOST_TENSORS):
            cumulative = [0]
            for length in lengths:
                cumulative.append(cumulative[-1] + length)
            batch.update(cu_seq_lens_q=cumulative, cu_seq_lens_k=list(cumulative),
                         max_length_q=max(lengths), max_length_k=max(lengths))
        batch[SAMPLE_LENGTHS] = lengths
        return batch


def _is_pack(feature: Dict[str, Any]) -> bool:
    first = feature["input_ids"][0]
    return isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) == 1


def training_inputs(train_dataset, tokenizer, *, packing: bool, max_length: int, cu_seq_lens: Optional[str],
                    ignore_index: int):
    """The train stage's data hook: the training dataset and collator for ``train.packing``.

    Args:
        cu_seq_lens: how packed batches carry cumulative sequence lengths
            (:attr:`npu_recipes.model.attention.AttentionChoice.cu_seq_lens`).

    Returns:
        ``(train_dataset, data_collator, stats)``: the dataset unchanged (unpacked) or packed, a
        :class:`PackedCollator` over a padding ``DataCollatorForSeq2Seq`` (labels padded with
        ``ignore_index``), and :func:`pack_dataset`'s stats (None unpacked).
    """
    from transformers import DataCollatorForSeq2Seq

    pad_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=ignore_index)
    if not packing:
        return train_dataset, PackedCollator(pad_collator), None
    packed, stats = pack_dataset(train_dataset, max_length)
    return packed, PackedCollator(pad_collator, cu_seq_lens=cu_seq_lens), stats


def longest_row(train_dataset) -> int:
    """Tokens in the longest row of a training dataset from :func:`training_inputs`: the longest
    sample, or with packing the fullest pack (what one micro-batch row holds at most, which the
    memory plan sizes activations by)."""
    rows = train_dataset["input_ids"][:]
    return max((sum(len(sample) for sample in row) if row and isinstance(row[0], list) else len(row) for row in rows), default=0)
