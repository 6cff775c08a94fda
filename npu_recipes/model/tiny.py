"""Tiny random-init models of each supported family, small enough to train on two CPU cores in seconds.

Built locally because no model hub is reachable on our machines or in CI: a byte-level BPE
tokenizer trained with the ``tokenizers`` library on ``demo_math`` text, carrying the family's
special tokens and a chat template written here that renders system, user and assistant turns as
the family's own template does, and a seeded random-init model of the family's architecture
(2 layers, hidden 64, 4 query / 2 key-value heads). Saved with ``torch_dtype: bfloat16`` in the
config, as the real checkpoints are, so dtype selection behaves as with them.

``tiny_qwen2`` (the demo's model; ChatML) is built exactly as before the other families existed,
so runs and committed losses that use it are unchanged. The others (:data:`FAMILIES`) exist for
tests of every family through train, merge, infer and serve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from npu_recipes.data import demo

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024
INIT_SEED = 1234

# ChatML, as Qwen2 uses: a default system turn when the conversation has none.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Qwen3: ChatML without a default system turn; assistant turns after the last user turn carry a
# <think> block (empty unless the content has one), earlier ones lose theirs; the generation prompt
# closes an empty block when enable_thinking=False.
QWEN3_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}{%- set reasoning = '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

# Llama 3.1: a system header with the knowledge cut-off and a date is always present; contents are trimmed.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set system_message = messages[0]['content'] | trim -%}"
    "{%- set messages = messages[1:] -%}{%- else -%}{%- set system_message = '' -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' -}}"
    "{{- system_message + '<|eot_id|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

# GLM-4: role tokens open each turn and nothing closes one; the model ends a reply with <|user|>
# (or <|endoftext|>), both in its generation config's stop set.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)

# DeepSeek-R1 distills: the system prompt first, reasoning before </think> dropped from assistant
# turns, and a generation prompt that opens a <think> block.
DEEPSEEK_R1_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{{- message['content'] -}}{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class Family:
    """How to build one family's tiny model.

    Attributes:
        config_class: the transformers config class name (``Qwen3Config``); its ``*ForCausalLM`` is built.
        special: special tokens, in id order from 0.
        eos, pad, bos: the tokenizer's special-token roles (bos None: none).
        stop: tokens generation stops on (the generation config's ``eos_token_id`` list).
        chat_template: the family's chat template (see the templates above).
        added: non-special added tokens (single tokens the real tokenizer has, e.g. ``<think>``).
        tie: ``tie_word_embeddings`` of the family's 7-9B checkpoints.
        extra: further config values of the family (GLM-4's partial rotary embedding, bias).
    """

    config_class: str
    special: List[str]
    eos: str
    pad: str
    bos: str | None
    stop: List[str]
    chat_template: str
    added: List[str] = field(default_factory=list)
    tie: bool = False
    extra: Dict[str, object] = field(default_factory=dict)


FAMILIES: Dict[str, Family] = {
    "qwen3": Family("Qwen3Config", SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>", None, ["<|im_end|>", "<|endoftext|>"],
                    QWEN3_CHAT_TEMPLATE, added=["<think>", "</think>"]),
    "llama3": Family("LlamaConfig", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                     "<|eot_id|>", "<|end_of_text|>", "<|begin_of_text|>", ["<|end_of_text|>", "<|eot_id|>"], LLAMA3_CHAT_TEMPLATE),
    "glm4": Family("Glm4Config", ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
                   "<|endoftext|>", "<|endoftext|>", None, ["<|endoftext|>", "<|user|>", "<|observation|>"], GLM4_CHAT_TEMPLATE,
                   extra={"partial_rotary_factor": 0.5, "attention_bias": True}),
    "deepseek_r1_distill_qwen": Family(
        "Qwen2Config", ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"], "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>", ["<｜end▁of▁sentence｜>"], DEEPSEEK_R1_CHAT_TEMPLATE, added=["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]),
}
"""The families besides ``tiny_qwen2``: ``model.builder=tiny_<name>`` builds one (see :mod:`npu_recipes.model.pretrained`)."""


def _training_text(rows: int = 2000) -> list[str]:
    return [f"{row['input']}\n{row['output']}\nAnswer: {row['answer']}" for row in demo.generate(rows, seed=99)]


def _bpe(special: List[str], rows: int) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_text(rows), trainer=trainer)
    return backend


def build_tokenizer():
    """Train tiny_qwen2's byte-level BPE tokenizer (vocabulary 1024 incl. 3 special tokens); deterministic."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(SPECIAL_TOKENS, 2000),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_family_tokenizer(family: Family):
    """Train a tokenizer for ``family`` (vocabulary 1024; 500 rows of text suffice for a test model); deterministic."""
    from transformers import PreTrainedTokenizerFast

    backend = _bpe(family.special, 500)
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in family.added])
    roles = {family.eos, family.pad, family.bos}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=family.eos,
        pad_token=family.pad,
        bos_token=family.bos,
        additional_special_tokens=[token for token in family.special if token not in roles],
        model_max_length=4096,
    )
    tokenizer.chat_template = family.chat_template
    return tokenizer


def _save(target: Path, tokenizer, config_class: str, tie: bool, stop: List[str], config_eos, extra: Dict[str, object]) -> None:
    """Save a seeded random-init ``config_class`` model with ``tokenizer`` into ``target``; generation stops
    on ``stop``; ``config_eos`` is config.json's ``eos_token_id`` (an id or a list, as the family's checkpoints have it)."""
    import transformers
    from transformers import GenerationConfig

    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=config_eos,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    torch.manual_seed(INIT_SEED)
    model = getattr(transformers, config_class.replace("Config", "ForCausalLM"))(config).to(torch.float32)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(token) for token in stop],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def build(target: Path) -> None:
    """Write tiny_qwen2's tokenizer, config, generation config and seeded random weights into ``target``."""
    tokenizer = build_tokenizer()
    _save(target, tokenizer, "Qwen2Config", True, ["<|im_end|>", "<|endoftext|>"], tokenizer.convert_tokens_to_ids("<|im_end|>"), {})


def build_family(name: str, target: Path) -> None:
    """Write the tiny model of family ``name`` (a key of :data:`FAMILIES`) into ``target``."""
    family = FAMILIES[name]
    tokenizer = build_family_tokenizer(family)
    stop_ids = [tokenizer.convert_tokens_to_ids(token) for token in family.stop]
    _save(target, tokenizer, family.config_class, family.tie, family.stop, stop_ids, family.extra)

