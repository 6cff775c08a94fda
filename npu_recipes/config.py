"""Composition support and validation: recipes as a Hydra group, override checks, cross-field rules.

Hydra composes ``conf/config.yaml`` (whose defaults list starts with the :class:`RecipeConfig`
schema) with the chosen group options and ``+recipe=NAME``. Before Hydra runs,
:func:`check_overrides` looks at each command-line override so that a misspelt key or an unknown
group option fails with the valid choices and the closest match. After composition,
:func:`validate` checks values that a type cannot (choices, ranges, combinations).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import string
import typing
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from npu_recipes import packing, paths, schema
from npu_recipes.errors import UserError

RECIPE_GROUP = "recipe"


def recipe_names() -> List[str]:
    """Names of the shipped recipes (``recipes/*.yaml`` stems), sorted."""
    return sorted(p.stem for p in paths.recipes_dir().glob("*.yaml"))


def register() -> None:
    """Register the schema, the ``${npu_cache:NAME}`` resolver and every shipped recipe with Hydra.

    Recipes live in the top-level ``recipes/`` directory (a name users look for) rather than in
    ``conf/recipe/``, so they are stored as the ``recipe`` group under the ``_global_`` package:
    ``+recipe=NAME`` then works exactly like Hydra's "configuring experiments" pattern. Each
    recipe's ``recipe`` key is set to its file name, so ``--cfg job`` shows it too.
    """
    schema.register()
    OmegaConf.register_new_resolver("npu_cache", lambda name: str(paths.cache_dir() / name), replace=True)
    store = ConfigStore.instance()
    for path in sorted(paths.recipes_dir().glob("*.yaml")):
        node = OmegaConf.load(path)
        node.recipe = path.stem
        store.store(group=RECIPE_GROUP, name=path.stem, node=node, package="_global_")


def group_options() -> Dict[str, List[str]]:
    """Config group name -> available option names (``conf/<group>/*.yaml``, plus ``recipe``)."""
    options = {
        group.name: sorted(p.stem for p in group.glob("*.yaml"))
        for group in paths.conf_dir().iterdir()
        if group.is_dir()
    }
    options[RECIPE_GROUP] = recipe_names()
    return options


def _closest(word: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _unwrap_optional(annotation):
    if typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else annotation
    return annotation


def _check_key(dotted: str) -> None:
    node_type: Optional[type] = schema.RecipeConfig
    walked: List[str] = []
    for part in dotted.split("."):
        if node_type is None or not dataclasses.is_dataclass(node_type):
            return
        fields = {f.name: _unwrap_optional(f.type) for f in dataclasses.fields(node_type)}
        if part not in fields:
            section = ".".join(walked) or "the top level"
            candidates = [".".join(walked + [name]) for name in fields] if walked else list(fields)
            full = ".".join(walked + [part])
            if not walked:
                candidates += list(group_options())
            raise UserError(
                f"unknown config key {full!r}{_closest(full, candidates)} (keys under {section}: "
                f"{', '.join(sorted(fields))})",
                fix="check the spelling; `python -m npu_recipes --cfg job` prints the whole config",
            )
        walked.append(part)
        node_type = fields[part]


def _check_type(dotted: str, value, text: str) -> None:
    probe = OmegaConf.structured(schema.RecipeConfig)
    try:
        OmegaConf.update(probe, dotted, value, merge=True)
    except OmegaConfBaseException as error:
        reason = str(error).splitlines()[0]
        raise UserError(f"{dotted}={text}: {reason}", fix=f"give {dotted} a value of the type shown by `--cfg job`") from None


def check_overrides(overrides: List[str]) -> None:
    """Check command-line overrides against the schema and the config groups before Hydra composes.

    Raises:
        UserError: an unparsable override, an unknown key, an unknown group option, or a recipe
            selected without ``+`` (names the key, the valid choices and the closest match).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise UserError(f"cannot parse override: {error}", fix="write overrides as key=value") from None
    groups = group_options()
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith("hydra.") or override.is_delete():
            continue
        if key in groups:
            if key == RECIPE_GROUP and not override.is_add():
                raise UserError(
                    f"recipes are selected with a leading plus: +recipe={override.get_value_element_as_str()}",
                    fix="write +recipe=NAME",
                )
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [
                override.get_value_element_as_str()
            ]
            for value in values:
                if value not in groups[key]:
                    noun = "recipe" if key == RECIPE_GROUP else f"option for {key}"
                    raise UserError(
                        f"unknown {noun} {value!r}{_closest(value, groups[key])}; available: {', '.join(groups[key])}",
                        fix=f"choose one of the names above (they are the files in "
                        f"{'recipes/' if key == RECIPE_GROUP else 'conf/' + key + '/'})",
                    )
            continue
        _check_key(key)
        if not override.is_sweep_override():
            _check_type(key, override.value(), override.get_value_element_as_str())


def _reject_choice(dotted: str, value: str, allowed: tuple) -> None:
    raise UserError(
        f"{dotted}={value!r} is not valid{_closest(value, allowed)}; choose one of: {', '.join(allowed)}",
        fix=f"pass {dotted}=<one of the choices above>",
    )


def _check_choice(dotted: str, value: str) -> None:
    allowed = schema.CHOICES[dotted]
    if value not in allowed:
        _reject_choice(dotted, value, allowed)


def _check_positive(name: str, value, minimum=0, inclusive=False) -> None:
    if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
        sign = ">=" if inclusive else ">"
        raise UserError(f"{name}={value} must be {sign} {minimum}", fix=f"pass {name} with a value {sign} {minimum}")


def _scheduler_types() -> List[str]:
    from transformers.trainer_utils import SchedulerType

    return [member.value for member in SchedulerType]


def _optimizer_names() -> List[str]:
    from transformers.training_args import OptimizerNames

    return [member.value for member in OptimizerNames]


def _check_choice_from_library(dotted: str, value: str, allowed: List[str]) -> None:
    if value not in allowed:
        raise UserError(
            f"{dotted}={value!r} is not valid{_closest(value, allowed)}; choose one of: {', '.join(allowed)}",
            fix=f"pass {dotted}=<one of the choices above> (transformers' names)",
        )


def _check_templates(dataset: schema.DatasetConfig) -> None:
    for key in ("system_template", "user_template", "assistant_template"):
        template = getattr(dataset, key)
        if template is None:
            continue
        try:
            list(string.Formatter().parse(template))
        except ValueError as error:
            raise UserError(
                f"dataset.{key}={template!r} is not a valid str.format template ({error})",
                fix="write columns as {column}; double literal braces as {{ and }}",
            ) from None


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
        raise UserError(f"invalid config: {error}") from None
    for dotted in schema.CHOICES:
        _check_choice(dotted, OmegaConf.select(cfg, dotted))
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
    _check_choice_from_library("train.lr_scheduler_type", train.lr_scheduler_type, _scheduler_types())
    _check_choice_from_library("train.optim", train.optim, _optimizer_names())
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(train, name)
        if not 0 <= value < 1:
            raise UserError(f"train.{name}={value} must be in [0, 1)", fix=f"pass e.g. train.{name}=0.9")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "seed", "dataloader_num_workers"):
        _check_positive(f"train.{name}", getattr(train, name), inclusive=True)
    _check_templates(config.dataset)
    if not str(config.dataset.path).strip():
        raise UserError("dataset.path is empty", fix="pass dataset.path=FILE or a hub id")
    if not 0 <= config.dataset.val_split_ratio < 1:
        raise UserError(
            f"dataset.val_split_ratio={config.dataset.val_split_ratio} must be in [0, 1)",
            fix="pass a fraction such as dataset.val_split_ratio=0.01",
        )
    if train.packing:
        packing.check_attention(config.model.attn_implementation)
    _check_positive("lora.r", config.lora.r)
    _check_positive("lora.lora_alpha", config.lora.lora_alpha)
    if not 0 <= config.lora.lora_dropout < 1:
        raise UserError(f"lora.lora_dropout={config.lora.lora_dropout} must be in [0, 1)", fix="pass e.g. lora.lora_dropout=0.05")
    train.gradient_checkpointing = _gradient_checkpointing(train.gradient_checkpointing)
    _check_parallelism(config, timestamped_output_dir="${now:" in str(OmegaConf.to_container(cfg, resolve=False)["output_dir"]))
    _check_positive("nan_guard.max_consecutive_bad_steps", config.nan_guard.max_consecutive_bad_steps)
    if config.mfu.peak_tflops is not None:
        _check_positive("mfu.peak_tflops", config.mfu.peak_tflops)
    if config.dataset.answer_format is not None and config.dataset.answer_format not in schema.ANSWER_FORMATS:
        _reject_choice("dataset.answer_format", config.dataset.answer_format, schema.ANSWER_FORMATS)
    _validate_infer(config.infer)
    _validate_serve(config.serve)
    if config.plan.device_memory_gib is not None:
        _check_positive("plan.device_memory_gib", config.plan.device_memory_gib)
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


def _check_parallelism(config: schema.RecipeConfig, timestamped_output_dir: bool) -> None:
    """Rules of ``parallelism.*`` and its combination with ``model.device_map`` (see docs/distributed.md)."""
    parallel = config.parallelism
    _check_positive("parallelism.nproc_per_node", parallel.nproc_per_node)
    _check_positive("parallelism.nnodes", parallel.nnodes)
    _check_positive("parallelism.ddp_timeout", parallel.ddp_timeout)
    _check_positive("parallelism.shutdown_timeout", parallel.shutdown_timeout)
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
    if parallel.nnodes > 1:
        if parallel.master_addr in ("127.0.0.1", "localhost", "::1") or parallel.master_port is None:
            raise UserError(
                f"a run over parallelism.nnodes={parallel.nnodes} nodes needs the master node's address and a port "
                f"(parallelism.master_addr={parallel.master_addr}, parallelism.master_port={parallel.master_port})",
                fix="pass parallelism.master_addr=<node 0's IP> parallelism.master_port=<free port>, the same on every node",
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


def load_resolved(path: Path) -> schema.RecipeConfig:
    """Load a run directory's ``resolved.yaml`` back into a typed :class:`RecipeConfig`.

    Workers and later stages call this instead of composing again.
    """
    merged = OmegaConf.merge(OmegaConf.structured(schema.RecipeConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def to_yaml(config: schema.RecipeConfig) -> str:
    """The YAML text of a resolved config (as written to ``resolved.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config), resolve=True)


def compose(overrides: List[str]) -> schema.RecipeConfig:
    """Compose and validate exactly as the CLI does, without running a stage.

    For tests and tools (docs generation, planning) that need a recipe's resolved settings.

    Raises:
        UserError: as :func:`check_overrides` and :func:`validate`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    check_overrides(overrides)
    with initialize_config_dir(version_base="1.3", config_dir=str(paths.conf_dir()), job_name="npu_recipes"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    return validate(cfg)
