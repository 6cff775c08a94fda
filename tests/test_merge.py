"""The merge stage: PEFT merge of a LoRA trained by the train stage, checked by logits (in this process where
the merged result is what is checked, through the real CLI where the command's contract is)."""

from __future__ import annotations

import json
import shutil

import pytest

from npu_recipes.model import tiny
from npu_recipes.run import lock
from tests.helpers import fixed_batch_logits, run_cli, run_in_process

pytestmark = pytest.mark.slow

# lr 1e-2 for 8 steps moves the LoRA far enough from its zero-initialised B that base and
# base+adapter logits differ clearly; dropout 0 is irrelevant to eval but keeps the run simple.
TRAIN = ("device=cpu", "train.max_steps=8", "train.save_steps=8", "train.gradient_accumulation_steps=1",
         "train.learning_rate=1e-2", "train.logging_steps=4", "dataset.val_split_ratio=0", "lora.lora_dropout=0")

def _train(run, *extra):
    """A LoRA of 8 steps, trained in this process (the ZeRO-3 merge test lives in test_distributed.py, on its run)."""
    run_in_process(*TRAIN, *extra, f"output_dir={run}")
    return run / "checkpoint-8"


def _merge(*args):
    run_in_process("stage=merge", "device=cpu", *args)


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("merge") / "run")


@pytest.fixture(scope="module")
def merged(lora_checkpoint):
    _merge(f"adapters={lora_checkpoint}", "merge.max_shard_size=200KB", "merge.torch_dtype=float32")
    return lora_checkpoint.with_name(lora_checkpoint.name + "-merged")


def test_merged_logits_equal_base_plus_adapter(lora_checkpoint, merged):
    with_adapter = fixed_batch_logits(f"adapters={lora_checkpoint}")
    base = fixed_batch_logits()
    merged_logits = fixed_batch_logits("model=local", f"model.name_or_path={merged}")
    assert (with_adapter - base).abs().max() > 0.05, "the trained LoRA should change the logits"
    assert (merged_logits - with_adapter).abs().max() <= 1e-4


def test_merged_directory_is_a_complete_sharded_model(lora_checkpoint, merged, tiny_model_path):
    from transformers import AutoTokenizer, GenerationConfig

    index = json.loads((merged / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((merged / s).is_file() for s in shards)
    assert (merged / "config.json").is_file()
    assert AutoTokenizer.from_pretrained(merged).chat_template == tiny.CHAT_TEMPLATE
    assert GenerationConfig.from_pretrained(merged).eos_token_id == GenerationConfig.from_pretrained(tiny_model_path).eos_token_id
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["kind"] == "merged_model"
    assert manifest["base_model"] == str(tiny_model_path)
    assert [a["path"] for a in manifest["adapters"]] == [str(lora_checkpoint)]
    assert manifest["training_run"] == str(lora_checkpoint.parent)
    assert manifest["dtype"] == "float32" and manifest["shards"] == shards
    assert manifest["weights_bytes"] == sum((merged / s).stat().st_size for s in shards)
    assert not [p for p in lora_checkpoint.parent.glob(".*") if p.name != lock.LOCK], "a temporary build directory was left behind"


def test_merge_refuses_an_existing_target(lora_checkpoint, merged):
    before = {p.name: p.stat().st_mtime_ns for p in merged.iterdir()}
    result = run_cli("stage=merge", "device=cpu", f"adapters={lora_checkpoint}")
    assert result.returncode == 2
    assert f"merge target {merged} already exists" in result.stderr and "merge.exist_ok=true" in result.stderr
    assert result.stderr.count("npu_recipes: error:") == 1 and "Traceback" not in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in merged.iterdir()} == before


def test_merge_with_nproc_per_node_set_runs_once_and_replaces_with_exist_ok(lora_checkpoint, merged, tmp_path, monkeypatch, capsys):
    """NPROC_PER_NODE=2 (the seed's multi-device style) and a multi-process parallelism (as a ZeRO-3
    recipe carries) must not turn merge into two processes; the command also names a hub model,
    which must not be fetched: the base comes from the adapter's run."""
    target = tmp_path / "replaced"
    shutil.copytree(merged, target)
    (target / "stale.txt").write_text("from the previous merge")
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    capsys.readouterr()
    _merge(f"adapters={lora_checkpoint}", "model=qwen2_7b_instruct", f"merge.output_dir={target}",
           "merge.exist_ok=true", "merge.torch_dtype=float32", "parallelism=zero3", "parallelism.nproc_per_node=2")
    assert capsys.readouterr().out.count("merged model:") == 1
    assert not (target / "stale.txt").exists()
    assert (target / "model.safetensors").is_file(), "the default max_shard_size (5GB) keeps the tiny model in one file"
    assert json.loads((target / "manifest.json").read_text())["base_model"] == json.loads(
        (merged / "manifest.json").read_text())["base_model"]
    assert not list(tmp_path.glob(".*"))
    assert (fixed_batch_logits("model=local", f"model.name_or_path={target}") - fixed_batch_logits(f"adapters={lora_checkpoint}")).abs().max() <= 1e-4


def test_lora_trained_on_a_merged_model_merges_again(merged, tmp_path):
    checkpoint = _train(tmp_path / "run2", "model=local", f"model.name_or_path={merged}")
    _merge(f"adapters={checkpoint}", "merge.torch_dtype=float32")
    merged_again = checkpoint.with_name(checkpoint.name + "-merged")
    manifest = json.loads((merged_again / "manifest.json").read_text())
    assert manifest["base_model"] == str(merged)
    with_adapter = fixed_batch_logits(f"adapters={checkpoint}")
    assert (with_adapter - fixed_batch_logits("model=local", f"model.name_or_path={merged}")).abs().max() > 0.05
    assert (fixed_batch_logits("model=local", f"model.name_or_path={merged_again}") - with_adapter).abs().max() <= 1e-4


def test_stacked_adapters_merge_into_what_infer_applies(lora_checkpoint, tmp_path):
    """Two adapters (the same checkpoint twice: the LoRA delta counted twice)."""
    stacked = f"adapters=[{lora_checkpoint},{lora_checkpoint}]"
    target = tmp_path / "stacked"
    _merge(stacked, f"merge.output_dir={target}", "merge.torch_dtype=float32")
    assert [a["name"] for a in json.loads((target / "manifest.json").read_text())["adapters"]] == ["checkpoint-8", "checkpoint-8_2"]
    with_both = fixed_batch_logits(stacked)
    assert (with_both - fixed_batch_logits(f"adapters={lora_checkpoint}")).abs().max() > 0.05
    assert (fixed_batch_logits("model=local", f"model.name_or_path={target}") - with_both).abs().max() <= 1e-4


def test_merge_without_adapters_says_what_to_pass():
    result = run_cli("stage=merge", "device=cpu")
    assert result.returncode == 2
    assert "stage=merge needs the LoRA checkpoint to merge" in result.stderr and "adapters=RUN_DIR/checkpoint-N" in result.stderr
    assert "Traceback" not in result.stderr
