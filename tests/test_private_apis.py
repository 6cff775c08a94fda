"""The non-public library methods and attributes npu_recipes relies on (docs/architecture.md lists
them), one test each, named after it: a release that renames, re-signs or changes one fails here
first, in-process and in seconds, rather than deep inside a training run."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from npu_recipes.errors import UserError


def _tiny_causal_lm(hidden_size: int = 32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


def _trainer(output_dir, model=None, max_steps: int = 1):
    from datasets import Dataset
    from transformers import TrainingArguments, default_data_collator

    from npu_recipes.config.schema import NanGuardConfig
    from npu_recipes.data.packing import PackedCollator
    from npu_recipes.model.flops import FlopsModel
    from npu_recipes.run.rundir import RunDir
    from npu_recipes.runtime.devices import Device
    from npu_recipes.train.nan_guard import NanGuard
    from npu_recipes.train.trainer import RecipeTrainer

    model = model or _tiny_causal_lm()
    rows = [[1, 2, 3, 4, 5, 6, 7, 8]] * 2
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=1, save_strategy="steps",
                             save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no")
    guard = NanGuard(NanGuardConfig(), RunDir(output_dir))
    return RecipeTrainer(model=model, args=args, data_collator=PackedCollator(default_data_collator),
                         train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}),
                         flops_model=FlopsModel.from_model(model, model.config), nan_guard=guard, device=Device("cpu", 1))


def test_trainer__save_checkpoint_and__get_output_dir(tmp_path):
    """``Trainer._save_checkpoint(model, trial)`` writes ``checkpoint-<step>`` under ``_get_output_dir(trial)``:
    RecipeTrainer points that at a staging directory and renames the finished checkpoint into place.
    It also sets ``state.best_model_checkpoint`` from ``state.best_global_step`` inside that directory,
    which RecipeTrainer clears before the call and names itself afterwards."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    assert "_get_output_dir(" in inspect.getsource(Trainer._save_checkpoint)
    assert "self.state.best_global_step" in inspect.getsource(Trainer._save_checkpoint)
    trainer = _trainer(tmp_path)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "model.safetensors").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1
    assert not list(tmp_path.glob(".partial-*")), "the staging directory must be renamed away"


def test_trainer__get_grad_norm(tmp_path):
    """``Trainer._get_grad_norm(model, grad_norm=None)`` returns the step's gradient norm (the clipping norm
    when clipping ran) just before ``on_pre_optimizer_step``; RecipeTrainer hands it to the NaN guard, which
    reads it there instead of computing a second norm over every gradient."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._get_grad_norm).parameters) == ["self", "model", "grad_norm"]
    import transformers.trainer

    source = inspect.getsource(transformers.trainer)
    call = source.index("grad_norm = self._get_grad_norm(")
    assert "on_pre_optimizer_step" in source[call:call + 300], "the norm must be computed right before the callback"
    trainer = _trainer(tmp_path)
    seen = []
    trainer.nan_guard.observe_grad_norm = seen.append
    trainer.train()
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor) and torch.isfinite(seen[0]) and seen[0] > 0


def test_trainer__load_from_checkpoint(tmp_path):
    """``Trainer._load_from_checkpoint(resume_from_checkpoint, model=None)`` loads a checkpoint's weights;
    one made for another model becomes a UserError naming the checkpoint."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == ["self", "resume_from_checkpoint", "model"]
    other = tmp_path / "checkpoint-1"
    _tiny_causal_lm(hidden_size=16).save_pretrained(other)
    trainer = _trainer(tmp_path / "run")
    with pytest.raises(UserError, match=rf"cannot resume from {other}: its weights do not fit this run"):
        trainer._load_from_checkpoint(str(other))


def test_trainer__load_optimizer_and_scheduler(tmp_path):
    """``Trainer._load_optimizer_and_scheduler(checkpoint)`` restores optimizer.pt and scheduler.pt; an
    optimizer state of other parameters becomes a UserError naming the checkpoint."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._load_optimizer_and_scheduler).parameters) == ["self", "checkpoint"]
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    stranger = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    torch.save(stranger.state_dict(), checkpoint / "optimizer.pt")
    torch.save(torch.optim.lr_scheduler.LambdaLR(stranger, lambda step: 1.0).state_dict(), checkpoint / "scheduler.pt")
    trainer = _trainer(tmp_path / "run")
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    with pytest.raises(UserError, match=rf"cannot resume from {checkpoint}: its optimizer and scheduler states do not fit"):
        trainer._load_optimizer_and_scheduler(str(checkpoint))
    # resume_weights_only: called after the trainer state is restored, it steps the fresh schedule to that step.
    trainer.weights_only_resume, trainer.state.global_step = True, 3
    trainer._load_optimizer_and_scheduler(str(checkpoint))
    assert trainer.lr_scheduler.last_epoch == 3


def test_hydra__internal_utils_get_args_parser():
    """The parser behind ``@hydra.main``: overrides, ``--multirun`` and the config-source options the CLI inspects."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(["-m", "+recipe=demo", "train.learning_rate=1e-4,2e-4"])
    assert args.multirun and args.overrides == ["+recipe=demo", "train.learning_rate=1e-4,2e-4"]
    assert args.config_name is None and args.config_path is None and args.config_dir is None
    # npu_recipes.commands.check_hydra_arguments: what the parser does not know comes back as unknown.
    _, unknown = get_args_parser().parse_known_args(["--model", "X", "+recipe=demo", "--cfg", "job"])
    assert unknown == ["--model"]


def test_datasets_dataset__fingerprint():
    """``Dataset._fingerprint``: a string that changes with the rows and that ``map(new_fingerprint=...)`` sets."""
    from datasets import Dataset

    rows = Dataset.from_dict({"text": ["a", "b"]})
    other = Dataset.from_dict({"text": ["a", "c"]})
    assert isinstance(rows._fingerprint, str) and rows._fingerprint != other._fingerprint
    assert rows.map(lambda row: row, new_fingerprint="npu-recipes-test")._fingerprint == "npu-recipes-test"


def test_huggingface_hub_parse_size_to_int():
    """``parse_size_to_int``: the sizes ``save_pretrained(max_shard_size=...)`` accepts, in bytes."""
    from huggingface_hub.serialization._base import parse_size_to_int

    assert parse_size_to_int("5GB") == 5 * 10**9 and parse_size_to_int("500MB") == 5 * 10**8
    with pytest.raises(ValueError):
        parse_size_to_int("five gigabytes")


def test_torch__dispatch_has_kernel_for_dispatch_key():
    """``torch._C._dispatch_has_kernel_for_dispatch_key(op, key)`` tells whether fused AdamW can run on a
    device type (Device.runs_fused_adamw): true for the CPU here, false for a key with no kernel."""
    from npu_recipes.runtime.devices import Device

    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_adamw_", "CPU") is True
    assert torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_adamw_", "PrivateUse1") is False
    assert Device("cpu", 1).runs_fused_adamw() is True


def test_torch_optimizer__step_supports_amp_scaling():
    """Fused torch optimizers declare ``_step_supports_amp_scaling`` and read a ``found_inf`` attribute set
    on them (the protocol ``torch.amp.GradScaler`` uses; the NaN guard sets it, train/nan_guard.py): with
    ``found_inf`` 1 the step changes neither the weights, Adam's moments nor its step count."""
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    assert optimizer._step_supports_amp_scaling is True
    weight.grad = torch.full((4,), 0.5)
    optimizer.step()
    after_one = (weight.detach().clone(), optimizer.state[weight]["exp_avg"].clone(), float(optimizer.state[weight]["step"]))
    weight.grad = torch.full((4,), float("nan"))
    optimizer.found_inf = torch.ones((), dtype=torch.float32)
    optimizer.step()
    del optimizer.found_inf
    assert torch.equal(weight.detach(), after_one[0]) and torch.equal(optimizer.state[weight]["exp_avg"], after_one[1])
    assert float(optimizer.state[weight]["step"]) == after_one[2] == 1.0
    weight.grad = torch.full((4,), 0.5)
    optimizer.step()
    assert float(optimizer.state[weight]["step"]) == 2.0 and not torch.equal(weight.detach(), after_one[0])


def test_tqdm_tqdm__instances():
    """``tqdm.tqdm._instances``: the bars still open, which ``errors.end_progress_bars`` closes before an error block."""
    import io

    from tqdm import tqdm

    from npu_recipes import errors

    stream = io.StringIO()
    bar = tqdm(total=3, file=stream)
    bar.update(1)
    assert bar in tqdm._instances
    errors.end_progress_bars()
    assert bar not in tqdm._instances and stream.getvalue().endswith("\n")


def test_deepspeed_opbuilder_jit_load():
    """``OpBuilder.jit_load(self, verbose=True)``: DeepSpeed's just-in-time build path (``load`` calls it for
    ops not built into the wheel), which ``deepspeed_config.announce_op_builds`` wraps to say what it compiles."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.op_builder.builder import OpBuilder

    from npu_recipes.runtime import deepspeed_config

    assert list(inspect.signature(OpBuilder.jit_load).parameters) == ["self", "verbose"]
    assert "self.jit_load(verbose)" in inspect.getsource(OpBuilder.load)
    deepspeed_config.announce_op_builds()
    wrapped = OpBuilder.jit_load
    deepspeed_config.announce_op_builds()
    assert OpBuilder.jit_load is wrapped and wrapped.announces
