"""Generating replies with transformers ``generate``: the one generation-config builder and stop set,
and batches with left padding.

:func:`generation_config` and :func:`stop_token_ids` serve the infer stage's batch evaluation, the
terminal chat and the server alike. Prompts are conversations (OpenAI-style message lists)
rendered with the tokenizer's chat template and an assistant generation prompt.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence

from npu_recipes.config.schema import InferConfig
from npu_recipes.infer.loading import LoadedModel

if TYPE_CHECKING:
    import torch

Messages = List[Dict[str, str]]
_SAMPLING_KEYS = ("temperature", "top_p", "top_k")


def _render(loaded: LoadedModel, conversations: Sequence[Messages]) -> List[str]:
    return [
        loaded.tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) for m in conversations
    ]


def stop_token_ids(base_config, tokenizer) -> List[int]:
    """Token ids that end a reply: the model's ``generation_config.json`` ``eos_token_id`` (one or a
    list), then the tokenizer's end-of-sequence token when the config lacks it (Qwen2's config lists
    ``<|im_end|>`` and ``<|endoftext|>``; a fine-tuned checkpoint may list neither)."""
    configured = base_config.eos_token_id
    stops = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    if tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    return [token for token in stops if token is not None]


def generation_config(base_config, tokenizer, *, max_new_tokens: int, do_sample: Optional[bool], temperature: Optional[float] = None,
                      top_p: Optional[float] = None, top_k: Optional[int] = None, repetition_penalty: Optional[float] = None):
    """A copy of the model's ``GenerationConfig`` (``base_config``) for one request or run.

    ``do_sample`` False is greedy decoding and clears temperature, top_p and top_k (which only apply
    to sampling; transformers warns about them otherwise); True samples with the given values over
    the model's; None keeps the model's own choice. ``eos_token_id`` is :func:`stop_token_ids`, and
    a model without a pad token pads with the tokenizer's.
    """
    config = copy.deepcopy(base_config)
    updates = {"max_new_tokens": max_new_tokens, "eos_token_id": stop_token_ids(base_config, tokenizer)}
    if do_sample is False:
        updates.update(do_sample=False, **{key: None for key in _SAMPLING_KEYS})
    elif do_sample:
        updates["do_sample"] = True
        given = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        updates.update({key: value for key, value in given.items() if value is not None})
    if repetition_penalty is not None:
        updates["repetition_penalty"] = repetition_penalty
    if config.pad_token_id is None:
        updates["pad_token_id"] = tokenizer.pad_token_id
    config.update(**updates)
    return config


def for_infer(loaded: LoadedModel, infer: InferConfig):
    """:func:`generation_config` for the ``infer.*`` options (the infer stage and its chat)."""
    return generation_config(loaded.model.generation_config, loaded.tokenizer, max_new_tokens=infer.max_new_tokens,
                             do_sample=infer.do_sample, temperature=infer.temperature, top_p=infer.top_p, top_k=infer.top_k,
                             repetition_penalty=infer.repetition_penalty)


@dataclass
class Reply:
    """One generated reply: its text (special tokens removed) and how many tokens were generated
    (up to and including the end-of-turn token)."""

    text: str
    generated_tokens: int


def _generated_length(tokens: torch.Tensor, stop_ids: set) -> int:
    for position, token in enumerate(tokens.tolist()):
        if token in stop_ids:
            return position + 1
    return len(tokens)


def generate(loaded: LoadedModel, conversations: Sequence[Messages], config, streamer=None) -> List[Reply]:
    """Generate one reply per conversation in a single ``generate`` call.

    Prompts are left-padded (``loaded.tokenizer.padding_side == "left"``) so every row's new tokens
    start at the same position; the attention mask hides the padding. ``streamer`` (e.g. a
    ``TextStreamer``) receives tokens as they are generated and needs a single conversation.

    Args:
        conversations: B message lists, each ending with a user turn.
        config: a ``GenerationConfig`` (:func:`generation_config`).

    Returns:
        B :class:`Reply` objects, in the order of ``conversations``.
    """
    import torch
    tokenizer, model = loaded.tokenizer, loaded.model
    inputs = tokenizer(_render(loaded, conversations), return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        output = model.generate(**inputs, generation_config=config, streamer=streamer)
    new_tokens = output[:, inputs["input_ids"].shape[1]:].cpu()
    stop_ids = set(config.eos_token_id)
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [Reply(text=text.strip(), generated_tokens=_generated_length(row, stop_ids)) for text, row in zip(texts, new_tokens)]


def batches_by_length(loaded: LoadedModel, conversations: Sequence[Messages], batch_size: int) -> Iterator[List[int]]:
    """Indices of ``conversations`` in batches of ``batch_size``, longest prompts first.

    Grouping prompts of similar length wastes fewer padded positions; starting with the longest
    makes an out-of-memory batch fail at once rather than at the end.
    """
    lengths = [len(ids) for ids in loaded.tokenizer(_render(loaded, conversations), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(conversations)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def split_prompt(messages: Messages, system: Optional[str] = None):
    """Split a dataset conversation into ``(prompt_messages, reference)``.

    A conversation ending with an assistant turn is prompt plus reference (that turn's text); one
    ending with a user turn is all prompt (reference None). ``system`` replaces the
    conversation's system turn (or is prepended when it has none).
    """
    if messages and messages[-1]["role"] == "assistant":
        prompt, reference = list(messages[:-1]), messages[-1]["content"]
    else:
        prompt, reference = list(messages), None
    if system is not None:
        prompt = [{"role": "system", "content": system}] + [m for m in prompt if m["role"] != "system"]
    return prompt, reference
