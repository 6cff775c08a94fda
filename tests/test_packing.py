"""Padding-free packing: bin packing, loss equality with unpacked training, no attention across samples."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from npu_recipes.config import compose
from npu_recipes.data import messages, packing, sources
from npu_recipes.model.attention import SDPA, adapt_model, choose
from tests.helpers import read_jsonl, run_in_process


@given(
    capacity=st.integers(min_value=8, max_value=4096),
    fractions=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=0, max_size=300),
)
@settings(max_examples=200, deadline=None)
def test_plan_packs_places_every_sample_once_within_capacity(capacity, fractions):
    lengths = [max(1, math.ceil(f * capacity)) for f in fractions]
    packs = packing.plan_packs(lengths, capacity)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    sizes = [sum(lengths[i] for i in pack) for pack in packs]
    assert all(size <= capacity for size in sizes)
    assert len(packs) >= math.ceil(sum(lengths) / capacity)
    # A pack is opened only for a sample that fits in no open pack, so no two packs could be merged.
    ordered = sorted(sizes)
    assert len(ordered) < 2 or ordered[0] + ordered[1] > capacity
    assert packing.plan_packs(lengths, capacity) == packs


def test_plan_packs_rejects_a_sample_longer_than_a_pack():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens"):
        packing.plan_packs([3, 9], capacity=8)


def test_longest_row_is_the_longest_sample_or_the_fullest_pack():
    from datasets import Dataset

    samples = Dataset.from_dict({"input_ids": [[1] * 5, [1] * 9, [1] * 2], "labels": [[1] * 5, [1] * 9, [1] * 2]})
    assert packing.longest_row(samples) == 9
    packed, _ = packing.pack_dataset(samples, capacity=12)
    assert packing.longest_row(packed) == 11, "packs [9, 2] and [5]"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def gsm8k_samples(gsm8k_dir, tokenizer):
    """The first 12 GSM8K training rows, tokenized as the train stage does (assistant-only labels)."""
    dataset = compose.compose(["dataset=gsm8k", f"dataset.path={gsm8k_dir / 'train.jsonl'}"]).dataset
    samples = []
    with open(gsm8k_dir / "train.jsonl") as lines:
        for row_id, line in zip(range(12), lines):
            conversation = messages.to_messages({**json.loads(line), sources.ROW_ID: row_id}, dataset)
            input_ids, labels = messages.tokenize_conversation(conversation, tokenizer)
            samples.append({"input_ids": input_ids, "labels": labels})
    return samples


ATTENTION_PATHS = ("sdpa", "eager", SDPA)
"""transformers' block-diagonal mask from position ids (sdpa, eager) and npu_recipes' SDPA per packed sample."""


def load_model(path, attention):
    """The tiny model with ``attention``: a transformers implementation, or npu_recipes' as a CPU run chooses it."""
    from transformers import AutoModelForCausalLM

    chosen = choose("auto", "cpu", packing=True) if attention == SDPA else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=chosen.load_as if chosen else attention)
    model.config.use_cache = False
    if chosen:
        adapt_model(model, chosen)
    assert model.config._attn_implementation == attention
    return model.eval()


def model_inputs(batch):
    """A collated batch without the host-side sample lengths (which the Trainer strips before the forward)."""
    return {key: value for key, value in batch.items() if key != packing.SAMPLE_LENGTHS}


def token_losses(logits, labels):
    """Cross-entropy of every labelled next-token prediction, in order (nats; shape [labelled tokens])."""
    shifted = labels[:, 1:].reshape(-1)
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted, reduction="none")
    return losses[shifted != messages.IGNORE_INDEX]


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
def test_packed_per_token_loss_equals_unpacked(tiny_model_path, tokenizer, gsm8k_samples, attention):
    """Packed micro-batches (packs of <= 1024 tokens) give each assistant token the same loss, and the
    model's token-averaged loss the same value, as one right-padded batch of the same 12 samples (fp32)."""
    from datasets import Dataset

    model = load_model(tiny_model_path, attention)
    cu_seq_lens = choose("auto", "cpu", packing=True).cu_seq_lens if attention == SDPA else None
    _, pad_collator, _ = packing.training_inputs(
        Dataset.from_list(gsm8k_samples), tokenizer, packing=False, max_length=1024, cu_seq_lens=None,
        ignore_index=messages.IGNORE_INDEX,
    )
    packed, collator, stats = packing.training_inputs(
        Dataset.from_list(gsm8k_samples), tokenizer, packing=True, max_length=1024, cu_seq_lens=cu_seq_lens,
        ignore_index=messages.IGNORE_INDEX,
    )
    assert stats["samples"] == 12 and stats["packs"] >= 3
    padded = model_inputs(pad_collator([dict(s) for s in gsm8k_samples]))
    assert (padded["attention_mask"] == 0).any(), "the unpacked batch should contain padding"
    with torch.no_grad():
        unpacked_out = model(**padded)
        unpacked = {}
        for row, sample in enumerate(gsm8k_samples):
            unpacked[tuple(sample["input_ids"])] = token_losses(unpacked_out.logits[row : row + 1], padded["labels"][row : row + 1])
        per_token, total, count = [], 0.0, 0
        for pack in packed:
            batch = collator([pack])
            assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
            out = model(**model_inputs(batch))
            losses = token_losses(out.logits, batch["labels"])
            total, count = total + losses.sum().item(), count + losses.numel()
            # Pair each packed sample's tokens with the same sample's unpacked tokens.
            starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
            for start, end in zip(starts, starts[1:]):
                ids = tuple(batch["input_ids"][0, start:end].tolist())
                per_token.append((token_losses(out.logits[:, start:end], batch["labels"][:, start:end]), unpacked[ids]))
    assert len(per_token) == 12
    for packed_losses, unpacked_losses in per_token:
        torch.testing.assert_close(packed_losses, unpacked_losses, atol=1e-4, rtol=0)
    assert total / count == pytest.approx(unpacked_out.loss.item(), abs=1e-4)


@pytest.mark.parametrize("attention", ATTENTION_PATHS)
def test_attention_does_not_leak_across_packed_samples(tiny_model_path, tokenizer, gsm8k_samples, attention):
    """Replacing the middle sample of a pack (by one of another length) leaves its neighbours' logits
    unchanged; without position ids (plain causal attention over the row) the same change does leak."""
    model = load_model(tiny_model_path, attention)
    collator = packing.PackedCollator(pad_collator=None, cu_seq_lens=choose("auto", "cpu", packing=True).cu_seq_lens)
    first, middle, last, other = (gsm8k_samples[i] for i in (0, 1, 2, 3))
    assert len(middle["input_ids"]) != len(other["input_ids"])

    def logits_of_neighbours(samples, use_position_ids=True):
        batch = collator([{key: [s[key] for s in samples] for key in ("input_ids", "labels")}])
        kwargs = {key: batch[key] for key in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
                  if key in batch} if use_position_ids else {}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], **kwargs).logits[0]
        n_first, n_last = len(samples[0]["input_ids"]), len(samples[2]["input_ids"])
        return logits[:n_first], logits[-n_last:], logits[n_first:-n_last]

    before_first, before_last, before_middle = logits_of_neighbours([first, middle, last])
    after_first, after_last, after_middle = logits_of_neighbours([first, other, last])
    torch.testing.assert_close(after_first, before_first, atol=1e-5, rtol=0)
    torch.testing.assert_close(after_last, before_last, atol=1e-5, rtol=0)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([last["input_ids"]])).logits[0]
    torch.testing.assert_close(after_last, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(before_middle[: len(other["input_ids"])], after_middle[: len(middle["input_ids"])], atol=1e-3)
    _, leaky_last, _ = logits_of_neighbours([first, other, last], use_position_ids=False)
    assert (leaky_last - alone).abs().max() > 1e-2


def test_collator_flattens_packs_and_pads_plain_samples(tokenizer):
    from transformers import DataCollatorForSeq2Seq

    collator = packing.PackedCollator(
        DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=messages.IGNORE_INDEX), cu_seq_lens=packing.DEVICE
    )
    packs = [
        {"input_ids": [[5, 6, 7], [8, 9]], "labels": [[-100, 6, 7], [-100, 9]]},
        {"input_ids": [[10, 11, 12, 13]], "labels": [[-100, -100, 12, 13]]},
    ]
    batch = collator(packs)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # The first label of every sample is -100, so no token is trained to predict across a boundary.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, 12, 13]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 9] and batch["max_length_q"] == 4
    assert "attention_mask" not in batch and batch[packing.SAMPLE_LENGTHS] == [3, 2, 4]

    host = packing.PackedCollator(collator.pad_collator, cu_seq_lens=packing.HOST_LISTS)(packs)
    assert host["cu_seq_lens_q"] == host["cu_seq_lens_k"] == [0, 3, 5, 9] and host["max_length_q"] == 4
    assert torch.equal(host["input_ids"], batch["input_ids"]) and torch.equal(host["position_ids"], batch["position_ids"])

    plain = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert plain["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert plain["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]] and plain[packing.SAMPLE_LENGTHS] == [3, 1]
    # Nothing padded: no mask, so attention runs causal without reading one from the device.
    unpadded = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}])
    assert "attention_mask" not in unpadded and unpadded[packing.SAMPLE_LENGTHS] == [3]


@pytest.mark.slow
def test_packed_training_run_logs_the_same_losses_as_unpacked(tmp_path, gsm8k_dir, gsm8k_samples):
    """Two runs of the train stage over the same 8 GSM8K rows, each optimizer step seeing all 8 (fp32, LoRA dropout 0):
    unpacked as one padded micro-batch of 8, packed as 1024-token packs accumulated over the step.
    Their logged losses (token-averaged over assistant tokens) agree within 1e-4 at every step."""
    common = [
        "dataset=gsm8k", f"dataset.path={gsm8k_dir / 'train.jsonl'}", "dataset.max_samples=8", "dataset.val_split_ratio=0",
        "device=cpu", "model.torch_dtype=float32", "lora.lora_dropout=0", "train.learning_rate=1e-2",
        "train.num_train_epochs=3", "train.logging_steps=1", "train.max_length=1024",
    ]
    run_in_process(*common, "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=1",
                   f"output_dir={tmp_path}/unpacked")
    packs = packing.plan_packs([len(s["input_ids"]) for s in gsm8k_samples[:8]], capacity=1024)
    run_in_process(*common, "train.packing=true", "train.per_device_train_batch_size=1",
                   f"train.gradient_accumulation_steps={len(packs)}", f"output_dir={tmp_path}/packed")
    losses = {
        name: [r["loss"] for r in read_jsonl(tmp_path / name / "logging.jsonl") if r["type"] == "train"]
        for name in ("unpacked", "packed")
    }
    assert len(losses["packed"]) == 3 and len(packs) >= 2
    assert losses["packed"] == pytest.approx(losses["unpacked"], abs=1e-4)
    assert losses["packed"][-1] < losses["packed"][0]
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert manifest["packing"]["samples"] == 8 and manifest["packing"]["packs"] == len(packs)
    assert manifest["packing"]["tokens"] == manifest["dataset"]["train_tokens"]
    assert manifest["packing"]["attention"] == SDPA
    assert json.loads((tmp_path / "unpacked" / "manifest.json").read_text())["packing"] is None
