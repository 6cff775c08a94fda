"""``tiny_qwen2``: a Qwen2-architecture model small enough to train on two CPU cores in seconds.

Built locally because no model hub is reachable on our machines or in CI: a byte-level BPE
tokenizer trained with the ``tokenizers`` library on ``demo_math`` text, Qwen's special tokens
(``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``), a ChatML chat template, and a seeded
random-init ``Qwen2ForCausalLM`` (2 layers, hidden 64, 4 query / 2 key-value heads, GQA like
Qwen2-7B). Saved with ``torch_dtype: bfloat16`` in its config, as Qwen2 checkpoints are, so dtype
selection behaves as with a real Qwen2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


def _training_text() -> list[str]:
    rows = demo.generate(2000, seed=99)
    return [f"{row['input']}\n{row['output']}\nAnswer: {row['answer']}" for row in rows]


def build_tokenizer():
    """Train the byte-level BPE tokenizer (vocabulary 1024 incl. 3 special tokens); deterministic."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(target: Path) -> None:
    """Write tokenizer, config, generation config and seeded random weights into ``target``."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(INIT_SEED)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
