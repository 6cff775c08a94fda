"""Loading base models and adapters for generation (shared by merge, infer and serve)."""

from __future__ import annotations

import dataclasses

import pytest

from npu_recipes.config import compose
from npu_recipes.errors import UserError
from npu_recipes.infer import adapters
from npu_recipes.runtime import devices
from tests.helpers import load_for_generation, run_in_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    run_in_process("device=cpu", "train.max_steps=2", "train.gradient_accumulation_steps=1", "dataset.val_split_ratio=0",
                   f"output_dir={run}")
    return run


def test_adapter_loads_on_the_base_of_its_run(lora_run):
    config = compose.compose(["device=cpu", "model=qwen2_7b_instruct", f"adapters={lora_run}/checkpoint-2"])
    loaded = load_for_generation(config, devices.resolve("cpu"))
    assert loaded.base.name_or_path.endswith("tiny_qwen2-v1")
    assert [a.name for a in loaded.adapters] == ["default"]
    assert loaded.model.active_adapter == "default"
    assert loaded.tokenizer.padding_side == "left"


def test_named_adapters_keep_their_names(lora_run):
    named = adapters.parse_adapters({"math.v1": f"{lora_run}/checkpoint-2", "other": f"{lora_run}/checkpoint-2"})
    assert [a.name for a in named] == ["math_v1", "other"]
    listed = adapters.parse_adapters([f"{lora_run}/checkpoint-2", f"{lora_run}/checkpoint-2"])
    assert [a.name for a in listed] == ["checkpoint-2", "checkpoint-2_2"]


def test_bad_adapter_paths_say_what_to_do(tmp_path, tiny_model_path):
    with pytest.raises(UserError, match="does not exist"):
        adapters.parse_adapters(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="is a full model checkpoint"):
        adapters.parse_adapters(str(tiny_model_path))
    with pytest.raises(UserError, match="holds no adapter files"):
        adapters.parse_adapters(str(tmp_path))


def test_adapter_names_that_become_the_same_peft_name_are_refused(lora_run):
    """``a.b`` and ``a_b`` are both ``a_b`` to PEFT: the second would silently replace the first."""
    with pytest.raises(UserError, match=r"the names 'a.b', 'a_b' become the same PEFT adapter name 'a_b'"):
        adapters.parse_adapters({"a.b": f"{lora_run}/checkpoint-2", "a_b": f"{lora_run}/checkpoint-2"})


def test_an_unreadable_resolved_yaml_beside_the_adapter_is_one_error(lora_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    for text in ("train: [unclosed", "{}"):
        (copy / "resolved.yaml").write_text(text)
        parsed = adapters.parse_adapters(f"{copy}/checkpoint-2")
        with pytest.raises(UserError, match=rf"adapters: {copy}/resolved.yaml, which names the base model .* is unreadable"):
            adapters.base_model_config(compose.compose(["device=cpu"]).model, parsed)


def _copy_of(lora_run, tmp_path, **model):
    """A copy of the LoRA run whose resolved.yaml records ``model`` keys as if it had been trained with them."""
    import shutil

    from npu_recipes.config import resolved

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    saved = resolved.load_resolved(copy / "resolved.yaml")
    (copy / "resolved.yaml").write_text(resolved.to_yaml(dataclasses.replace(saved, model=dataclasses.replace(saved.model, **model))))
    return copy


def test_model_keys_given_on_the_command_line_win_over_the_runs_resolved_yaml(lora_run, tmp_path):
    """Trained with model.device_map=auto: merge, infer and serve load with model.device_map=null when
    the command line says so, and keep the run's setting otherwise."""
    run = _copy_of(lora_run, tmp_path, device_map="auto", torch_dtype="bfloat16")
    explicit = compose.compose(["device=cpu", "stage=merge", "model.device_map=null", f"adapters={run}/checkpoint-2"])
    parsed = adapters.parse_adapters(explicit.adapters)
    base = adapters.base_model_config(explicit.model, parsed, compose.command_line_keys())
    assert (base.device_map, base.torch_dtype) == (None, "bfloat16")
    assert base.name_or_path.endswith("tiny_qwen2-v1")
    assert adapters.base_model_source(parsed, compose.command_line_keys()) == (
        f"{run}/resolved.yaml; model.device_map from the command line")
    implicit = compose.compose(["device=cpu", "stage=merge", f"adapters={run}/checkpoint-2"])
    assert adapters.base_model_config(implicit.model, parsed, compose.command_line_keys()).device_map == "auto"
    assert adapters.base_model_source(parsed, compose.command_line_keys()) == f"{run}/resolved.yaml"


def test_run_slash_best_is_the_checkpoint_the_manifest_names(lora_run, tmp_path):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-1")
    manifest = json.loads((run / "manifest.json").read_text())
    best = {"metric": "eval_loss", "greater_is_better": False, "checkpoint": "/elsewhere/checkpoint-1", "step": 1, "value": 1.25,
            "best_evaluated_step": 1, "best_evaluated_value": 1.25}
    (run / "manifest.json").write_text(json.dumps({**manifest, "best_checkpoint": best}))
    (parsed,) = adapters.parse_adapters(f"{run}/best")
    assert parsed.path == run / "checkpoint-1", "found in the run directory, wherever the run was when it trained"
    shutil.rmtree(run / "checkpoint-1")
    with pytest.raises(UserError, match=rf"adapters: {run}/best is checkpoint-1 \(eval_loss 1.2500\), which is no longer in {run}"):
        adapters.parse_adapters(f"{run}/best")
