"""Validation: the rules a field's type cannot express (choices, ranges, combinations), checked after composition.

:func:`validate` turns the composed ``DictConfig`` into a typed, frozen
:class:`~npu_recipes.config.schema.RecipeConfig` or raises one :class:`~npu_recipes.errors.UserError`
naming the key at fault.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import os
import string
from typing import List

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from npu_recipes.config import schema
from npu_recipes.config.resolved import from_plain, to_plain
from npu_recipes.config.schema import did_you_mean
from npu_recipes.errors import UserError


def _reject_choice(dotted: str, value: str, allowed: tuple) -> None:
    raise UserError(
        f"{dotted}={value!r} is not valid{did_you_mean(value, allowed)}; choose one of: {', '.join(allowed)}",
        fix=f"pass {dotted}=<one of the choices above>",
    )


def _check_choice(dotted: str, value: str) -> None:
    allowed = schema.CHOICES[dotted]
    if value not in allowed:
        _reject_choice(dotted, value, allowed)


def _check_positive(name: str, value, minimum=0, inclusive=False) -> None:
    sign = ">=" if inclusive else ">"
    if not math.isfinite(value):
        raise UserError(f"{name}={value} is not a finite number", fix=f"pass {name} with a finite value {sign} {minimum}")
    if value < minimum or (value == minimum and not inclusive):
        raise UserError(f"{name}={value} must be {sign} {minimum}", fix=f"pass {name} with a value {sign} {minimum}")


SCHEDULERS_WITHOUT_ARGUMENTS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "greedy",
)
"""transformers' ``lr_scheduler_type`` values that ``get_scheduler`` builds from warmup and total steps
alone (transformers 5.25; tests/test_config.py holds this list to the installed transformers).
These validate without importing transformers; any other name is checked against transformers itself."""

COMMON_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_npu_fused", "adafactor", "sgd", "adagrad", "rmsprop")
"""``train.optim`` values that validate without importing transformers (each one of its
``OptimizerNames``, which tests/test_config.py checks); any other name is checked against transformers itself."""


def _scheduler_types() -> List[str]:
    from transformers.trainer_utils import SchedulerType

    return [member.value for member in SchedulerType]


def _optimizer_names() -> List[str]:
    from transformers.training_args import OptimizerNames

    return [member.value for member in OptimizerNames]


def _check_choice_from_library(dotted: str, value: str, allowed: List[str]) -> None:
    if value not in allowed:
        raise UserError(
            f"{dotted}={value!r} is not valid{did_you_mean(value, allowed)}; choose one of: {', '.join(allowed)}",
            fix=f"pass {dotted}=<one of the choices above> (transformers' names)",
        )


def _check_templates(dataset: schema.DatasetConfig) -> None:
    for key in ("system_template", "user_template", "assistant_template"):
        template = getattr(dataset, key)
        if template is None:
            continue
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as error:
            raise UserError(
                f"dataset.{key}={template!r} is not a valid str.format template ({error})",
                fix="write columns as {column}; double literal braces as {{ and }}",
            ) from None
        for name in fields:
            if not name or name.isdigit() or any(mark in name for mark in ".["):
                raise UserError(
                    f"dataset.{key}={template!r}: {{{name}}} is not a column name (templates fill whole columns by name; "
                    "{} and {0} are positional, {a.b} and {a[0]} read inside a column)",
                    fix="name each column: {question}; map nested data with dataset.messages_column instead",
                )
        try:
            template.format(**dict.fromkeys(fields, "text"))
        except (ValueError, KeyError, IndexError) as error:
            raise UserError(
                f"dataset.{key}={template!r} cannot be filled with text ({type(error).__name__}: {error})",
                fix="write columns as {column} (conversions !s/!r and text format specs such as {column:>10} work); "
                "double literal braces as {{ and }}",
            ) from None


MAX_VAL_SPLIT_RATIO = 0.5
"""Largest ``dataset.val_split_ratio``: holding out more rows than are trained on is taken for a mistake
(0.99 for 0.01), which would otherwise train on a handful of rows without a word."""

EVAL_METRICS = ("eval_loss", "loss")
"""``train.metric_for_best_model`` values: the evaluation computes the loss only (``prediction_loss_only``);
``loss`` is transformers' short name for ``eval_loss``."""


def _check_best_model(train: schema.TrainConfig, val_split_ratio: float, parallelism: schema.ParallelismConfig) -> None:
    """``train.metric_for_best_model`` and ``load_best_model_at_end`` as transformers' Trainer accepts them."""
    if train.metric_for_best_model not in EVAL_METRICS:
        raise UserError(
            f"train.metric_for_best_model={train.metric_for_best_model!r} is not a metric the evaluation reports "
            "(it computes eval_loss on the validation split, nothing else)",
            fix="pass train.metric_for_best_model=eval_loss",
        )
    if not train.load_best_model_at_end:
        return
    if val_split_ratio <= 0:
        raise UserError(
            "train.load_best_model_at_end=true needs evaluations to find the best checkpoint, but "
            f"dataset.val_split_ratio={val_split_ratio} holds out no rows to evaluate",
            fix="pass dataset.val_split_ratio=0.01 (or more), or train.load_best_model_at_end=false",
        )
    if train.save_steps % train.eval_steps:
        raise UserError(
            f"train.load_best_model_at_end=true needs every saved step evaluated, but train.save_steps={train.save_steps} "
            f"is not a multiple of train.eval_steps={train.eval_steps}",
            fix=f"pass train.save_steps={train.eval_steps * max(1, round(train.save_steps / train.eval_steps))} "
            f"(a multiple of train.eval_steps={train.eval_steps}), or change train.eval_steps",
        )
    if train.save_only_model and parallelism.zero_stage is not None:
        raise UserError(
            "train.load_best_model_at_end=true cannot load a train.save_only_model=true checkpoint under DeepSpeed "
            f"(parallelism={parallelism.name}): transformers refuses the combination",
            fix="drop train.save_only_model, or train.load_best_model_at_end",
        )


SEED_MAX = 2**32 - 1
"""Largest seed ``transformers.set_seed`` accepts (numpy's ``RandomState`` limit)."""


def _check_text_and_types(config: schema.RecipeConfig) -> None:
    """Values a field's type admits but the stages cannot use: empty paths, non-path adapters,
    non-string target modules, seeds numpy refuses, unknown report_to integrations, schedulers
    that need arguments npu_recipes does not pass, unparsable shard sizes."""
    for dotted, value in (("output_dir", config.output_dir), ("model.name_or_path", config.model.name_or_path),
                          ("dataset.split", config.dataset.split)):
        if not str(value).strip():
            raise UserError(f"{dotted} is empty", fix=f"pass {dotted}=VALUE")
    _check_adapters_value(config.adapters)
    targets = config.lora.target_modules
    if not (isinstance(targets, str) and targets.strip()) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t.strip() for t in targets)
    ):
        raise UserError(
            f"lora.target_modules={targets!r} is neither a module name pattern nor a list of module names",
            fix="pass lora.target_modules=all-linear or lora.target_modules=[q_proj,v_proj]",
        )
    for dotted, seed in (("train.seed", config.train.seed), ("infer.seed", config.infer.seed)):
        if seed is not None and not 0 <= seed <= SEED_MAX:
            raise UserError(f"{dotted}={seed} is outside 0..{SEED_MAX}", fix=f"pass {dotted}=N with 0 <= N <= {SEED_MAX}")
    _check_positive("train.adam_epsilon", config.train.adam_epsilon)
    if config.dataset.num_rows is not None:
        _check_positive("dataset.num_rows", config.dataset.num_rows)
    _check_report_to(config.train.report_to)
    _check_shard_size(config.merge.max_shard_size)


def _check_adapters_value(adapters) -> None:
    if adapters is None or isinstance(adapters, str):
        return
    if isinstance(adapters, list) and all(isinstance(path, str) for path in adapters):
        return
    if isinstance(adapters, dict) and all(isinstance(path, str) for path in adapters.values()):
        return
    raise UserError(
        f"adapters={adapters!r} is not a checkpoint path, a list of paths or a name -> path mapping",
        fix="pass adapters=RUN/checkpoint-N, 'adapters=[A,B]' or 'adapters={name: A}'",
    )


def _check_report_to(report_to: str) -> None:
    names = [name.strip() for name in report_to.split(",")] if report_to.strip() not in ("", "none", "all") else []
    if not names:
        return
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    installed = get_available_reporting_integrations()
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            _check_choice_from_library("train.report_to", name, ["none", "all", *sorted(INTEGRATION_TO_CALLBACK)])
        if name not in installed:
            raise UserError(
                f"train.report_to={report_to!r}: {name} is not installed here (installed: {', '.join(installed) or 'none'})",
                fix=f"pip install {name}, or pass train.report_to=none",
            )


SCHEDULERS_ON_EVALUATION = ("reduce_lr_on_plateau", "greedy")
"""Schedulers that step on evaluation results: transformers refuses them without an evaluation."""


def _check_scheduler(name: str, val_split_ratio: float) -> None:
    if name in SCHEDULERS_ON_EVALUATION and val_split_ratio <= 0:
        raise UserError(
            f"train.lr_scheduler_type={name} changes the learning rate on evaluation results, but "
            f"dataset.val_split_ratio={val_split_ratio} holds out no rows to evaluate",
            fix="pass dataset.val_split_ratio=0.01 (or more), or another train.lr_scheduler_type such as cosine",
        )
    if name in SCHEDULERS_WITHOUT_ARGUMENTS:
        return
    _check_choice_from_library("train.lr_scheduler_type", name, _scheduler_types())
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(name, optimizer, num_warmup_steps=0, num_training_steps=10)
    except (ValueError, TypeError) as error:
        raise UserError(
            f"train.lr_scheduler_type={name} needs arguments npu_recipes does not pass (transformers: {error})",
            fix="choose another train.lr_scheduler_type, e.g. cosine or linear",
        ) from None


def shard_size(value: str):
    """``merge.max_shard_size`` as ``save_pretrained`` takes it: a byte count (``"500000000"``) as
    an int, a size with a unit (``"5GB"``) as the text."""
    return int(value) if value.strip().isdigit() else value


def _check_shard_size(value: str) -> None:
    from huggingface_hub.serialization._base import parse_size_to_int

    size = shard_size(value)
    try:
        size = size if isinstance(size, int) else parse_size_to_int(size)
    except ValueError as error:
        raise UserError(f"merge.max_shard_size={value!r} is not a size ({error})", fix="pass e.g. merge.max_shard_size=5GB") from None
    if size <= 0:
        raise UserError(f"merge.max_shard_size={value!r} must be positive", fix="pass e.g. merge.max_shard_size=5GB")


def _check_resolved_types(config: schema.RecipeConfig) -> None:
    """OmegaConf checks a scalar's type after resolving an interpolation, but not a section's or a
    list's (``nan_guard.inject_nan_at_steps=${oc.env:HOME}`` resolves to text). Reading the config
    back as :func:`load_resolved` reads resolved.yaml checks them all."""
    defaults = schema.RecipeConfig()
    misplaced = [f.name for f in dataclasses.fields(config)
                 if dataclasses.is_dataclass(getattr(defaults, f.name)) and not dataclasses.is_dataclass(getattr(config, f.name))]
    try:
        from_plain(to_plain(config))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or (misplaced[0] if misplaced else "a value")
        raise UserError(
            f"{key} has the wrong type after resolving interpolations: {str(error).splitlines()[0]}",
            fix=f"give {key} a value of the type shown by `--cfg job`",
        ) from None


def _user_error_in(error: BaseException):
    """The UserError an OmegaConf error wraps (a resolver raised it), following the exception chain; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def validate(cfg: DictConfig) -> schema.RecipeConfig:
    """Resolve ``cfg`` into a typed :class:`RecipeConfig` and check rules that types cannot express.

    Raises:
        UserError: a mandatory value is missing, a value is outside its choices or range, or two
            settings contradict each other.
    """
    try:
        config: schema.RecipeConfig = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        raise UserError(f"{error.full_key} has no value", fix=f"pass {error.full_key}=VALUE on the command line") from None
    except OmegaConfBaseException as error:
        raised = _user_error_in(error)
        if raised is not None:
            # A resolver's own message (e.g. a Slurm node list scontrol cannot expand).
            raise raised from None
        raise UserError(f"invalid config: {error}") from None
    _check_resolved_types(config)
    for dotted in schema.CHOICES:
        _check_choice(dotted, functools.reduce(getattr, dotted.split("."), config))
    train = config.train
    _check_positive("train.learning_rate", train.learning_rate)
    _check_positive("train.per_device_train_batch_size", train.per_device_train_batch_size)
    _check_positive("train.per_device_eval_batch_size", train.per_device_eval_batch_size)
    _check_positive("train.gradient_accumulation_steps", train.gradient_accumulation_steps)
    _check_positive("train.logging_steps", train.logging_steps)
    _check_positive("train.save_steps", train.save_steps)
    _check_positive("train.eval_steps", train.eval_steps)
    _check_positive("train.max_length", train.max_length, minimum=8, inclusive=True)
    if config.dataset.max_samples is not None:
        _check_positive("dataset.max_samples", config.dataset.max_samples)
    if train.max_steps == 0 or train.max_steps < -1:
        raise UserError(
            f"train.max_steps={train.max_steps} is neither a step count nor -1 (train by epochs)",
            fix="pass train.max_steps=N with N > 0, or train.max_steps=-1 and train.num_train_epochs=N",
        )
    if train.max_steps == -1:
        _check_positive("train.num_train_epochs", train.num_train_epochs)
    _check_scheduler(train.lr_scheduler_type, config.dataset.val_split_ratio)
    if train.optim not in COMMON_OPTIMIZERS:
        _check_choice_from_library("train.optim", train.optim, _optimizer_names())
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(train, name)
        if not 0 <= value < 1:
            raise UserError(f"train.{name}={value} must be in [0, 1)", fix=f"pass e.g. train.{name}=0.9")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "seed", "dataloader_num_workers"):
        _check_positive(f"train.{name}", getattr(train, name), inclusive=True)
    _check_templates(config.dataset)
    _check_text_and_types(config)
    if not str(config.dataset.path).strip():
        raise UserError("dataset.path is empty", fix="pass dataset.path=FILE or a hub id")
    ratio = config.dataset.val_split_ratio
    if not 0 <= ratio < 1:
        raise UserError(f"dataset.val_split_ratio={ratio} must be in [0, 1)", fix="pass a fraction such as dataset.val_split_ratio=0.01")
    if ratio > MAX_VAL_SPLIT_RATIO:
        raise UserError(
            f"dataset.val_split_ratio={ratio} holds out {ratio:.0%} of the rows for validation and trains on the other {1 - ratio:.0%}",
            fix=f"pass the share of rows to hold out for validation, at most {MAX_VAL_SPLIT_RATIO}: e.g. dataset.val_split_ratio=0.01",
        )
    _check_best_model(train, ratio, config.parallelism)
    _check_positive("lora.r", config.lora.r)
    _check_positive("lora.lora_alpha", config.lora.lora_alpha)
    if not 0 <= config.lora.lora_dropout < 1:
        raise UserError(f"lora.lora_dropout={config.lora.lora_dropout} must be in [0, 1)", fix="pass e.g. lora.lora_dropout=0.05")
    train = dataclasses.replace(train, gradient_checkpointing=_gradient_checkpointing(train.gradient_checkpointing))
    config = dataclasses.replace(config, train=train)
    _check_parallelism(config, timestamped_output_dir="${now:" in str(OmegaConf.to_container(cfg, resolve=False)["output_dir"]))
    if train.global_batch_size is not None:
        accumulation = accumulation_steps_for(train.global_batch_size, train.per_device_train_batch_size, config.parallelism)
        config = dataclasses.replace(config, train=dataclasses.replace(train, gradient_accumulation_steps=accumulation))
    _check_positive("nan_guard.max_consecutive_bad_steps", config.nan_guard.max_consecutive_bad_steps)
    not_steps = [step for step in config.nan_guard.inject_nan_at_steps if step < 1]
    if not_steps:
        raise UserError(f"nan_guard.inject_nan_at_steps holds {not_steps}: optimizer steps are numbered from 1",
                        fix="list steps >= 1, e.g. nan_guard.inject_nan_at_steps=[3,4]")
    if config.mfu.peak_tflops is not None:
        _check_positive("mfu.peak_tflops", config.mfu.peak_tflops)
    if config.dataset.answer_format is not None and config.dataset.answer_format not in schema.ANSWER_FORMATS:
        _reject_choice("dataset.answer_format", config.dataset.answer_format, schema.ANSWER_FORMATS)
    _validate_infer(config.infer)
    _validate_serve(config.serve)
    if config.plan.device_memory_gib is not None:
        _check_positive("plan.device_memory_gib", config.plan.device_memory_gib)
    if not 0 < config.doctor.memory_used_warn < 1:
        raise UserError(f"doctor.memory_used_warn={config.doctor.memory_used_warn} must be a fraction in (0, 1)",
                        fix="pass e.g. doctor.memory_used_warn=0.1 (warn above 10% used)")
    return config


_CHECKPOINTING_WORDS = {"true": True, "false": False, "auto": "auto"}


def _gradient_checkpointing(value):
    """``train.gradient_checkpointing`` as True, False or ``"auto"``; the words also as strings in
    any case (an ``${oc.env:...}`` interpolation or a quoted YAML value gives a string).

    Raises:
        UserError: any other value, numbers included (``1`` is not a setting the docs name).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _CHECKPOINTING_WORDS:
        return _CHECKPOINTING_WORDS[value.strip().lower()]
    raise UserError(
        f"train.gradient_checkpointing={value!r} ({type(value).__name__}) is not one of true, false, auto",
        fix="pass train.gradient_checkpointing=auto (decided by the memory planner), true or false",
    )


def accumulation_steps_for(global_batch_size: int, per_device_train_batch_size: int, parallelism: schema.ParallelismConfig) -> int:
    """Gradient accumulation steps that make ``global_batch_size`` samples per optimizer step:
    ``global_batch_size / (per_device_train_batch_size x parallelism.world_size)``.

    Raises:
        UserError: ``global_batch_size`` is not a positive multiple of micro-batch x world size
            (names the three numbers and the nearest sizes that divide).
    """
    _check_positive("train.global_batch_size", global_batch_size)
    world = parallelism.world_size
    per_step = per_device_train_batch_size * world
    if global_batch_size % per_step:
        below, above = global_batch_size // per_step * per_step, (global_batch_size // per_step + 1) * per_step
        nearest = f"{below} or {above}" if below else str(above)
        raise UserError(
            f"train.global_batch_size={global_batch_size} is not a multiple of train.per_device_train_batch_size="
            f"{per_device_train_batch_size} x world size {world} (parallelism={parallelism.name}: "
            f"{parallelism.nproc_per_node} process(es) x {parallelism.nnodes} node(s)) = {per_step} samples per micro-step",
            fix=f"pass train.global_batch_size={nearest}, or change train.per_device_train_batch_size or the process count",
        )
    return global_batch_size // per_step


SAME_HOST_NODES = "NPU_RECIPES_SAME_HOST_NODES"
"""Set to 1 to allow a loopback ``master_addr`` for several nodes: every "node" runs on this one machine
(a rehearsal, as the tests do on 127.0.0.2)."""


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and every loopback IP address (all of 127.0.0.0/8, ``::1``, ``[::1]``)."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _check_parallelism(config: schema.RecipeConfig, timestamped_output_dir: bool) -> None:
    """Rules of ``parallelism.*`` and its combination with ``model.device_map`` (see docs/distributed.md)."""
    parallel = config.parallelism
    _check_positive("parallelism.nproc_per_node", parallel.nproc_per_node)
    _check_positive("parallelism.nnodes", parallel.nnodes)
    _check_positive("parallelism.ddp_timeout", parallel.ddp_timeout)
    _check_positive("parallelism.shutdown_timeout", parallel.shutdown_timeout)
    _check_positive("parallelism.stop_timeout", parallel.stop_timeout)
    if parallel.stop_timeout >= parallel.shutdown_timeout:
        raise UserError(
            f"parallelism.stop_timeout={parallel.stop_timeout} s must be below parallelism.shutdown_timeout={parallel.shutdown_timeout} s: "
            "after a stop signal the step must end, and the checkpoint be saved, before torchrun kills the workers",
            fix=f"pass parallelism.stop_timeout below {parallel.shutdown_timeout}, or raise parallelism.shutdown_timeout",
        )
    if config.resume_weights_only and parallel.zero_stage is not None:
        raise UserError(
            f"resume_weights_only=true is not supported with DeepSpeed ZeRO (parallelism={parallel.name}): DeepSpeed resumes "
            "its weights and optimizer partitions together",
            fix="resume from a checkpoint that holds its DeepSpeed states (global_step*/), or start a new run from step 0",
        )
    _check_positive("parallelism.join_timeout", parallel.join_timeout)
    if not 0 <= parallel.node_rank < parallel.nnodes:
        raise UserError(
            f"parallelism.node_rank={parallel.node_rank} must be in [0, parallelism.nnodes={parallel.nnodes})",
            fix="number the nodes 0, 1, ... nnodes-1, with node_rank=0 on the master node",
        )
    if parallel.master_port is not None and not 1 <= parallel.master_port <= 65535:
        raise UserError(f"parallelism.master_port={parallel.master_port} is not a TCP port", fix="pass a port in 1..65535")
    if parallel.zero_stage is not None and parallel.zero_stage not in (0, 1, 2, 3):
        raise UserError(
            f"parallelism.zero_stage={parallel.zero_stage} is not a DeepSpeed ZeRO stage",
            fix="choose parallelism=zero2, zero3 or zero3_offload, or pass zero_stage 0..3 (null: no DeepSpeed)",
        )
    if parallel.offload_optimizer_device != "none" and not parallel.zero_stage:
        raise UserError(
            f"parallelism.offload_optimizer_device={parallel.offload_optimizer_device} needs DeepSpeed ZeRO (stage 1-3), "
            f"but parallelism.zero_stage={parallel.zero_stage}",
            fix="choose parallelism=zero3_offload, or set parallelism.zero_stage",
        )
    if parallel.offload_param_device != "none" and parallel.zero_stage != 3:
        raise UserError(
            f"parallelism.offload_param_device={parallel.offload_param_device} needs ZeRO stage 3, "
            f"but parallelism.zero_stage={parallel.zero_stage}",
            fix="choose parallelism=zero3_offload, or set parallelism.offload_param_device=none",
        )
    if parallel.nnodes > 1 and config.stage != "plan":  # the plan (and its job files) start nothing
        loopback = is_loopback(parallel.master_addr) and os.environ.get(SAME_HOST_NODES) != "1"
        if loopback or parallel.master_port is None:
            raise UserError(
                f"a run over parallelism.nnodes={parallel.nnodes} nodes needs the master node's address and a port "
                f"(parallelism.master_addr={parallel.master_addr}"
                + (" is a loopback address, which other machines cannot reach" if loopback else "")
                + f", parallelism.master_port={parallel.master_port})",
                fix="pass parallelism.master_addr=<node 0's IP> parallelism.master_port=<free port>, the same on every node "
                f"(to rehearse several nodes on this one machine, set {SAME_HOST_NODES}=1)",
            )
        if timestamped_output_dir:
            raise UserError(
                f"a run over parallelism.nnodes={parallel.nnodes} nodes needs an explicit output_dir "
                "(each node would otherwise name its run directory by its own clock)",
                fix="pass output_dir=DIR, the same on every node",
            )
    if config.model.device_map is not None:
        if parallel.zero_stage is not None:
            raise UserError(
                f"model.device_map={config.model.device_map} spreads one model over several devices per process, "
                f"which DeepSpeed ZeRO (parallelism={parallel.name}) cannot combine with its own partitioning",
                fix="drop model.device_map (ZeRO-3 already shards the model), or choose parallelism=single",
            )
        if parallel.nproc_per_node * parallel.nnodes > 1:
            raise UserError(
                f"model.device_map={config.model.device_map} spreads one model over every visible device, so "
                f"{parallel.nproc_per_node * parallel.nnodes} processes (parallelism={parallel.name}) would all claim the same devices",
                fix="drop model.device_map, or choose parallelism=single",
            )


def _validate_infer(infer: schema.InferConfig) -> None:
    """Ranges of the generation options (as transformers ``GenerationConfig.validate`` expects them)."""
    _check_positive("infer.max_new_tokens", infer.max_new_tokens)
    _check_positive("infer.batch_size", infer.batch_size)
    if infer.max_samples is not None:
        _check_positive("infer.max_samples", infer.max_samples)
    if infer.temperature is not None:
        _check_positive("infer.temperature", infer.temperature)
    if infer.top_k is not None:
        _check_positive("infer.top_k", infer.top_k)
    if infer.repetition_penalty is not None:
        _check_positive("infer.repetition_penalty", infer.repetition_penalty)
    if infer.top_p is not None and not 0 < infer.top_p <= 1:
        raise UserError(f"infer.top_p={infer.top_p} must be in (0, 1]", fix="pass e.g. infer.top_p=0.8")
    sampling = [f"infer.{key}" for key in ("temperature", "top_p", "top_k") if getattr(infer, key) is not None]
    if sampling and not infer.do_sample:
        raise UserError(
            f"sampling options are set ({', '.join(sampling)}) but infer.do_sample=false (greedy decoding ignores them)",
            fix="add infer.do_sample=true to sample, or drop those options for greedy decoding",
        )


def _validate_serve(serve: schema.ServeConfig) -> None:
    if not 0 <= serve.port <= 65535:
        raise UserError(f"serve.port={serve.port} is not a TCP port", fix="pass serve.port=N with 1 <= N <= 65535 (0 picks a free port)")
    _check_positive("serve.max_batch_size", serve.max_batch_size)
    _check_positive("serve.batch_wait_ms", serve.batch_wait_ms, inclusive=True)
    _check_positive("serve.default_max_tokens", serve.default_max_tokens)
    _check_positive("serve.max_tokens_limit", serve.max_tokens_limit)
    _check_positive("serve.max_request_bytes", serve.max_request_bytes)
    if serve.default_max_tokens > serve.max_tokens_limit:
        raise UserError(
            f"serve.default_max_tokens={serve.default_max_tokens} exceeds serve.max_tokens_limit={serve.max_tokens_limit}",
            fix="lower serve.default_max_tokens or raise serve.max_tokens_limit",
        )
    if serve.max_model_len is not None:
        _check_positive("serve.max_model_len", serve.max_model_len)
    if serve.timeout_graceful_shutdown is not None:
        _check_positive("serve.timeout_graceful_shutdown", serve.timeout_graceful_shutdown)
    if serve.api_key is not None and not serve.api_key.strip():
        raise UserError("serve.api_key is empty", fix="pass a non-empty key, or leave serve.api_key unset to serve without authentication")

