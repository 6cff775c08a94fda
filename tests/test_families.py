"""Every model family besides Qwen2 (Qwen3, Llama 3, GLM-4, DeepSeek-R1-Distill-Qwen): assistant-only label
masks under each family's chat template, shipped config.json for the planner, and a tiny random model of
each through train (LoRA and full), merge, infer and serve, driven by the seed's swift-style commands.

Everything runs in this process (tests.helpers.run_in_process) on tiny models built once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npu_recipes.config import compose, swift
from npu_recipes.data.messages import IGNORE_INDEX, tokenize_conversation
from npu_recipes.model import pretrained, tiny
from tests.helpers import load_for_generation, read_jsonl, run_in_process

FAMILIES = pretrained.TINY_FAMILIES
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6"},
]
# What each family's template makes of CONVERSATION's two answers: the labelled text of each turn.
LABELLED = {
    "qwen3": ["4<|im_end|>", "<think>\n\n</think>\n\n6<|im_end|>"],
    "llama3": ["4<|eot_id|>", "6<|eot_id|>"],
    "glm4": ["\n4<|user|>", "\n6<|endoftext|>"],
    "deepseek_r1_distill_qwen": ["4<｜end▁of▁sentence｜>", "6<｜end▁of▁sentence｜>"],
}
SHIPPED = {"qwen3": "qwen3_8b", "llama3": "llama3_1_8b_instruct", "glm4": "glm4_9b", "deepseek_r1_distill_qwen": "deepseek_r1_distill_qwen_7b"}
"""Each family's conf/model option for a real checkpoint."""


@pytest.fixture(scope="session")
def family_model(isolated_caches):
    """Build (once per session) and return the directory of a family's tiny model."""
    from npu_recipes.config.schema import ModelConfig

    def build(family: str) -> Path:
        path = Path(isolated_caches) / "npu_recipes" / f"tiny_{family}-v1"
        return Path(pretrained.resolve_path(ModelConfig(name_or_path=str(path), builder=f"tiny_{family}")))

    return build


def labelled_spans(ids, labels, tokenizer) -> list[str]:
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


def test_every_family_has_a_builder_and_a_shipped_model_option():
    assert set(FAMILIES) == set(tiny.FAMILIES) == set(LABELLED) == set(SHIPPED)
    from transformers import AutoConfig

    from npu_recipes.plan import memory

    for option in SHIPPED.values():
        config = compose.compose([f"model={option}"])
        shipped = pretrained.shipped_config_dir(config.model.name_or_path)
        assert shipped is not None, f"{option}: no config.json shipped for {config.model.name_or_path}"
        numbers = memory._architecture_numbers(AutoConfig.from_pretrained(shipped))
        assert numbers["num_layers"] >= 28 and numbers["hidden_size"] >= 3584 and numbers["num_kv_heads"] < numbers["num_heads"]


@pytest.mark.parametrize("family", FAMILIES)
def test_label_masks_follow_each_familys_template(family, family_model):
    """Exactly each assistant reply and the token that ends it carry labels: the end-of-turn token, or
    for GLM-4 (which closes no turn) the next turn's <|user|> and, after the last reply, EOS; Qwen3's
    empty <think> block before its last reply is part of that reply."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_model(family))
    ids, labels = tokenize_conversation(CONVERSATION, tokenizer)
    assert len(ids) == len(labels)
    assert labelled_spans(ids, labels, tokenizer) == LABELLED[family]
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(ids).startswith(rendered)


def test_qwen3_keeps_the_last_replys_reasoning_and_drops_earlier_ones(family_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family_model("qwen3"))
    thinking = [dict(m) for m in CONVERSATION]
    thinking[2]["content"] = "<think>\nsmall sum\n</think>\n\n4"
    thinking[4]["content"] = "<think>\nadd three\n</think>\n\n6"
    assert labelled_spans(*tokenize_conversation(thinking, tokenizer), tokenizer) == [
        "4<|im_end|>", "<think>\nadd three\n</think>\n\n6<|im_end|>"]


def _chat_rows(path: Path, count: int) -> Path:
    from npu_recipes.data import demo

    rows = [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": row["input"]},
                          {"role": "assistant", "content": f"{row['output']}\n\nAnswer: {row['answer']}"}]}
            for row in demo.generate(count, seed=7)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _run(command: str, *arguments: str) -> None:
    """Run a swift-style command in this process, as `npu-recipes COMMAND ARGUMENTS` runs it."""
    run_in_process(*swift.translate(command, list(arguments), {}).overrides, "device=cpu")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_merges_infers_and_serves(family, family_model, tmp_path):
    """The seed's flow on a tiny model of the family: `sft` (LoRA, 2 steps), `export --merge_lora`,
    `infer --load_data_args` on the merged model, `deploy` of the adapter (the real app, in process),
    and full fine-tuning for a step."""
    model, data, run = family_model(family), _chat_rows(tmp_path / "chat.jsonl", 12), tmp_path / "run"
    common = ["--model", str(model), "--dataset", str(data), "--per_device_train_batch_size", "2",
              "--gradient_accumulation_steps", "1", "--max_length", "256", "--add_version", "false"]
    _run("sft", *common, "--max_steps", "2", "--split_dataset_ratio", "0.25", "--output_dir", str(run), "--learning_rate", "1e-2")
    losses = [r["loss"] for r in read_jsonl(run / "logging.jsonl") if r["type"] == "train"]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    checkpoint = run / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()

    _run("export", "--adapters", str(checkpoint), "--merge_lora", "true")
    merged = run / "checkpoint-2-merged"
    _run("infer", "--model", str(merged), "--load_data_args", "true", "--max_new_tokens", "4")
    (results,) = (merged / "infer_result").glob("*.jsonl")
    assert len(read_jsonl(results)) == 3, "the run held out 3 of 12 rows"

    _serve_one_request(family, checkpoint)

    full = tmp_path / "full"
    _run("sft", *common, "--train_type", "full", "--max_steps", "1", "--split_dataset_ratio", "0", "--output_dir", str(full))
    assert (full / "checkpoint-1" / "model.safetensors").is_file()


def _serve_one_request(family: str, checkpoint: Path) -> None:
    """`npu-recipes deploy --adapters CHECKPOINT`: the serve stage's app with its batcher and generator, driven in
    this process through Starlette's test client instead of a socket."""
    from fastapi.testclient import TestClient

    from npu_recipes.runtime.devices import Device
    from npu_recipes.serving.app import create_app
    from npu_recipes.serving.server import build_backend

    config = compose.compose(swift.translate("deploy", ["--adapters", str(checkpoint)], {}).overrides)
    device = Device("cpu", 1)
    loaded = load_for_generation(config, device)
    adapter = loaded.adapters[0].name
    backend = build_backend(loaded, config.serve, device)
    with TestClient(create_app(backend)) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": adapter, "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == adapter and 1 <= body["usage"]["completion_tokens"] <= 4
    assert isinstance(body["choices"][0]["message"]["content"], str)
