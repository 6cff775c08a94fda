"""ms-swift's commands (`npu-recipes sft|infer|export|deploy`): every command block of the seed document
composes like its recipe, each flag translates as docs/swift.md says, and bad flags are one clear error."""

from __future__ import annotations

import dataclasses
import re
import shlex

import pytest

from npu_recipes.config import compose, swift
from npu_recipes.errors import UserError
from tests.helpers import REPO, SHARED, run_cli

SEED = SHARED / "seed" / "NPU_SUPPORT.md"
METADATA = ("recipe", "description", "reference", "output_dir")
"""Fields a recipe sets for itself (name, description, the seed's figures) and the run directory's name."""


def seed_commands() -> list[tuple[dict, str, list[str]]]:
    """(environment, subcommand, arguments) of every `swift` command in the seed's shell blocks, with
    `...` written out as the single-card command's other flags (what the seed means by it)."""
    if not SEED.is_file():
        pytest.skip(f"seed document not found at {SEED}")
    commands = []
    for block in re.findall(r"```shell\n(.*?)```", SEED.read_text(), flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block).replace(" ...", " " + swift.SEED_REMAINING_FLAGS)
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            if "swift" not in words:
                continue
            at = words.index("swift")
            environment = dict(word.split("=", 1) for word in words[:at])
            commands.append((environment, words[at + 1], words[at + 2:]))
    return commands


def _composed(monkeypatch, environment: dict, overrides: tuple, cache: dict):
    """``compose.compose(overrides)`` under ``environment``, once per distinct pair (the seed repeats commands)."""
    key = (tuple(sorted(environment.items())), overrides)
    if key not in cache:
        for variable in ("NPROC_PER_NODE", "ASCEND_RT_VISIBLE_DEVICES"):
            monkeypatch.delenv(variable, raising=False)
        for variable, value in environment.items():
            monkeypatch.setenv(variable, value)
        cache[key] = compose.compose(list(overrides))
    return cache[key]


def _without_metadata(config) -> dict:
    return {key: value for key, value in dataclasses.asdict(config).items() if key not in METADATA}


# What each seed command must compose like: a recipe (training) or the npu_recipes line the README gives.
EXPECTED = {
    ("", "sft", False): ["+recipe=qwen7b_lora_single", "train.packing=false", "train.gradient_accumulation_steps=16"],
    ("4", "sft", False): ["+recipe=qwen7b_lora_ddp4"],
    ("4", "sft", "zero2"): ["+recipe=qwen7b_lora_zero2"],
    ("4", "sft", "zero3"): ["+recipe=qwen7b_lora_zero3"],
}


def _expected_overrides(environment: dict, command: str, arguments: list[str]) -> list[str]:
    if command == "sft":
        deepspeed = arguments[arguments.index("--deepspeed") + 1] if "--deepspeed" in arguments else False
        return EXPECTED[(environment.get("NPROC_PER_NODE", ""), command, deepspeed)]
    flags = swift.parse(command, arguments)
    stage = {"infer": "stage=infer", "export": "stage=merge", "deploy": "stage=serve"}[command]
    overrides = [stage]
    if "model" in flags:
        model = flags["model"][0]
        overrides += ["model=qwen2_7b_instruct"] if model == "Qwen/Qwen2-7B-Instruct" else ["model=local", f"model.name_or_path={model}"]
    if "adapters" in flags:
        overrides.append(f"adapters={flags['adapters'][0]}")
    if command == "infer" and "load_data_args" in flags:
        overrides.append("load_data_args=true")
    return overrides


def test_every_seed_command_block_composes_like_its_recipe(monkeypatch, tmp_path):
    """The seed's `swift` commands (4 sft, 3 infer, 2 export, 3 deploy) with `swift` replaced by
    `npu-recipes` compose exactly the config of the matching recipe or README line, up to the
    recipe's own name, description, reference figures and run directory. The seed's placeholder
    checkpoints exist as directories, as they would after training."""
    monkeypatch.chdir(tmp_path)
    for placeholder in ("xxx/checkpoint-xxx", "xx/checkpoint-xxx", "xxx/checkpoint-xxx-merged"):
        (tmp_path / placeholder).mkdir(parents=True)
    commands = seed_commands()
    assert [c for _, c, _ in commands].count("sft") == 4 and {c for _, c, _ in commands} == {"sft", "infer", "export", "deploy"}
    cache: dict = {}
    for environment, command, arguments in commands:
        config = _composed(monkeypatch, environment, tuple(swift.translate(command, arguments, environment).overrides), cache)
        expected = _composed(monkeypatch, environment, tuple(_expected_overrides(environment, command, arguments)), cache)
        assert _without_metadata(config) == _without_metadata(expected), (command, arguments)
        if command == "sft":
            assert config.output_dir.startswith("output/") and config.dataset.val_split_ratio == 0.01


@pytest.mark.parametrize("arguments,overrides", [
    (["--dataset", "AI-ModelScope/blossom-math-v2#500"], ["dataset=blossom_math_v2", "dataset.max_samples=500"]),
    (["--dataset", "org/other", "--use_hf", "true"], ["dataset=local", "dataset.path=org/other", "dataset.hub=huggingface"]),
    (["--model", "Qwen/Qwen3-8B"], ["model=qwen3_8b"]),
    (["--model", "someone/Model-7B"], ["model=local", "model.name_or_path=someone/Model-7B", "model.hub=modelscope"]),
    (["--model", "./ckpt"], ["model=local", "model.name_or_path=./ckpt"]),
    (["--deepspeed", "zero3_offload"], ["parallelism=zero3_offload", "parallelism.nproc_per_node=1"]),
    (["--output_dir", "out", "--add_version", "false"], ["output_dir=out"]),
    (["--target_modules", "q_proj", "v_proj", "--lora_rank", "16"], ["lora.target_modules=[q_proj,v_proj]", "lora.r=16"]),
    (["--attn_impl", "flash_attn", "--truncation_strategy", "delete"],
     ["model.attn_implementation=flash_attention_2", "train.truncation_strategy=drop"]),
    (["--warmup_ratio=0.05", "--gradient_checkpointing", "false"], ["train.warmup_steps=0.05", "train.gradient_checkpointing=false"]),
])
def test_sft_flags_translate_as_docs_swift_md_says(arguments, overrides):
    assert swift.translate("sft", arguments, {}).overrides == overrides


def test_generation_and_serving_flags():
    assert swift.translate("infer", ["--adapters", "a/checkpoint-1", "b/checkpoint-2", "--temperature", "0.7"], {}).overrides == [
        "stage=infer", "adapters=[a/checkpoint-1,b/checkpoint-2]", "infer.temperature=0.7", "infer.do_sample=true"]
    assert swift.translate("deploy", ["--model", "./m", "--port", "0", "--max_batch_size", "4"], {}).overrides == [
        "stage=serve", "model=local", "model.name_or_path=./m", "serve.port=0", "serve.max_batch_size=4"]
    assert swift.translate("export", ["--adapters", "r/checkpoint-3", "--merge_lora", "true", "--output_dir", "m"], {}).overrides == [
        "stage=merge", "adapters=r/checkpoint-3", "merge.output_dir=m"]
    assert swift.translate("sft", [], {"NPROC_PER_NODE": "2"}).overrides == ["parallelism=ddp"]


@pytest.mark.parametrize("command,arguments,message", [
    ("sft", ["--learning_rat", "1e-4"], "unknown flag --learning_rat (did you mean '--learning_rate'?)"),
    ("sft", ["--port", "8000"], "--port is a flag of npu-recipes deploy, not of npu-recipes sft"),
    ("sft", ["--model", "X", "..."], "stands for the single-card command's other flags"),
    ("sft", ["train.learning_rate=1e-4"], "take swift-style flags (--key value), not key=value overrides"),
    ("sft", ["--deepspeed", "ds_z3.json"], "npu_recipes generates the DeepSpeed config"),
    ("sft", ["--deepspeed", "zero1"], "choose one of: zero2, zero3, zero3_offload"),
    ("sft", ["--dataset", "a.jsonl", "b.jsonl"], "npu_recipes trains on one per run"),
    ("sft", ["--packing", "maybe"], "--packing maybe: not true or false"),
    ("sft", ["--lora_rank"], "--lora_rank has no value"),
    ("export", ["--adapters", "r/checkpoint-3"], "add --merge_lora true"),
    ("infer", ["--infer_backend", "vllm"], "NPUs do not run vLLM"),
])
def test_bad_flags_are_one_clear_error(command, arguments, message):
    with pytest.raises(UserError) as caught:
        swift.translate(command, arguments, {})
    assert message in str(caught.value)


def test_docs_swift_md_carries_the_flag_table():
    """docs/swift.md's table is :func:`npu_recipes.config.swift.flags_table` (regenerate the section from it)."""
    assert swift.flags_table() in (REPO / "docs" / "swift.md").read_text()


@pytest.mark.cli
def test_a_swift_command_prints_its_npu_recipes_line_then_runs_it(tmp_path):
    """The translated line is printed before it runs, and what it runs is checked like any command line
    (here a value of the wrong type: exit 2 with one error block, before anything loads)."""
    result = run_cli("sft", "--model", "Qwen/Qwen2-7B-Instruct", "--learning_rate", "fast", cwd=tmp_path)
    assert result.returncode == 2
    assert "npu_recipes: sft runs as: python -m npu_recipes model=qwen2_7b_instruct train.learning_rate=fast\n" in result.stderr
    assert "npu_recipes: error: train.learning_rate=fast" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()
