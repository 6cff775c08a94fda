"""Plan stage: the resolved settings, the launch command and a per-device memory estimate.

Runs before any device is rented: it needs no accelerator and reads nothing of the model but
config.json (a local directory, or that one file fetched from the model's hub). It creates no run
directory and runs once in the process the user started, whatever the parallelism. When the
estimate does not fit the target device, it names the next option that does.
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from npu_recipes import accelerators, devices, launch, memory, models
from npu_recipes.accelerators import Target
from npu_recipes.rundir import RESOLVED, RunDir
from npu_recipes.schema import RecipeConfig

IN_LAUNCHER_ONLY = True
"""The runner calls this stage in its own process and never starts workers for it."""

# Parallelisms by the memory they need per device, most first (ddp holds what single holds), with
# the DeepSpeed settings their conf/parallelism/<name>.yaml sets (a test holds the two together):
# zero_stage, offload_optimizer_device, offload_param_device.
_LADDER = ("ddp", "zero2", "zero3", "zero3_offload")
PARALLELISM_SETTINGS = {
    "ddp": (None, "none", "none"),
    "zero2": (2, "none", "none"),
    "zero3": (3, "none", "none"),
    "zero3_offload": (3, "cpu", "cpu"),
}
RUN_DIR = "RUN_DIR"
"""Stands for the run directory in the printed worker command (``output_dir``; by default a new
``outputs/<recipe>/<time>``)."""
_MORE_DEVICES = (2, 4, 8)
_SHORTEST_MAX_LENGTH = 256


@dataclass(frozen=True)
class Suggestion:
    """An option that fits: the overrides to add and the estimate with them (GiB per device)."""

    overrides: List[str]
    total_gib: float
    why: str


@dataclass(frozen=True)
class Launch:
    """How the run starts.

    Attributes:
        environment: variables for the user's command (the devices the run may use).
        command: what the user types.
        workers: the torchrun command line the runner starts (:mod:`npu_recipes.launch`), with
            ``RUN_DIR`` for the run directory; None when the stage runs in the launching process.
        worker_environment: what the runner sets for every worker (``DS_ACCELERATOR``).
    """

    environment: Dict[str, str]
    command: List[str]
    workers: Optional[List[str]]
    worker_environment: Dict[str, str]

    def shell(self) -> str:
        """The command with its environment, as one line to paste into a shell."""
        return " ".join([*(f"{key}={shlex.quote(value)}" for key, value in self.environment.items()), shlex.join(self.command)])


def launch_for(config: RecipeConfig, device_type: str, user_args: Sequence[str]) -> Launch:
    """The :class:`Launch` of ``config`` on ``device_type`` machines, built by the launcher's own
    functions (:func:`npu_recipes.launch.torchrun_arguments`, :meth:`npu_recipes.launch.Plan.command`)."""
    parallel = config.parallelism
    device = devices.Device(device_type, parallel.nproc_per_node)
    environment = {}
    if device.visibility_variable:
        environment[device.visibility_variable] = ",".join(str(i) for i in range(parallel.nproc_per_node))
    command = ["python", "-m", "npu_recipes", *user_args]
    if launch.runs_in_process(config):
        return Launch(environment, command, None, {})
    world = parallel.nproc_per_node * parallel.nnodes
    workers = launch.Plan(device, world, False, launch.torchrun_arguments(config)).command(Path(RUN_DIR) / RESOLVED)
    return Launch(environment, command, ["python", *workers[1:]], device.worker_environment())


@dataclass(frozen=True)
class Plan:
    """Everything ``stage=plan`` reports. Memory figures in GiB per device unless named otherwise.

    ``demand_gib`` is what must fit into ``usable_gib``: the per-device estimate on accelerators;
    on the CPU all processes of a node share the RAM, so it is ``nproc_per_node`` estimates plus
    what offload keeps in host memory. With ``train.gradient_checkpointing=auto``, ``config`` holds
    the decision (see :func:`decide_checkpointing`) and ``without_checkpointing_gib`` the demand
    without checkpointing it was made on.
    """

    config: RecipeConfig
    shape: memory.ModelShape
    model_dir: str
    dtype: str
    target: Target
    memory_gib: float
    reserve_gib: float
    estimate: memory.Estimate
    demand_gib: float
    launch: Launch
    suggestion: Optional[Suggestion]
    without_checkpointing_gib: Optional[float] = None

    @property
    def usable_gib(self) -> float:
        return self.memory_gib - self.reserve_gib

    @property
    def fits(self) -> bool:
        return self.demand_gib <= self.usable_gib


def prepare(config: RecipeConfig, fresh_output_dir: bool) -> None:
    """Nothing to prepare and no run directory: the plan only prints."""
    return None


def run(config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
    """Print the plan (``plan.format``: text or json) to stdout.

    Raises:
        UserError: config.json cannot be read or fetched (see :func:`npu_recipes.models.fetch_config`).
    """
    # With no argument at all the CLI runs the demo recipe; stage=train keeps the command this config.
    user_args = [arg for arg in sys.argv[1:] if not arg.startswith(("stage=", "plan.", "-"))] or ["stage=train"]
    plan = make(config, user_args)
    print(json.dumps(to_dict(plan), indent=2) if config.plan.format == "json" else render_text(plan), flush=True)


def dtype_for(config: RecipeConfig, shape: memory.ModelShape, target: Target) -> str:
    """The weights' dtype on ``target``: an explicit ``model.torch_dtype``, else the target's rule."""
    if config.model.torch_dtype != "auto":
        return config.model.torch_dtype
    return target.auto_dtype or shape.declared_dtype


def estimate_for(config: RecipeConfig, shape: memory.ModelShape, target: Target) -> memory.Estimate:
    """The per-device estimate of ``config`` for a model of ``shape`` on ``target``."""
    return memory.estimate(shape, memory.setting_from_config(config, dtype_for(config, shape, target)), target)


def demand_gib(config: RecipeConfig, estimate: memory.Estimate, target: Target) -> float:
    """GiB that must fit into one device of ``target`` (all processes of a node on the CPU)."""
    if target.memory_gib is None:
        return (config.parallelism.nproc_per_node * estimate.total_bytes + estimate.host_bytes) / memory.GIB
    return estimate.total_gib


def _with_parallelism(config: RecipeConfig, name: str, nproc_per_node: int) -> RecipeConfig:
    """A copy of ``config`` with ``parallelism=name parallelism.nproc_per_node=N``."""
    changed = copy.deepcopy(config)
    parallel = changed.parallelism
    parallel.name, parallel.nproc_per_node = name, nproc_per_node
    parallel.zero_stage, parallel.offload_optimizer_device, parallel.offload_param_device = PARALLELISM_SETTINGS[name]
    return changed


def _candidates(config: RecipeConfig):
    """Changes that lower per-device memory, least disruptive first: (overrides, why, changed config)."""
    train, parallelism = config.train, config.parallelism
    if not train.gradient_checkpointing:
        changed = copy.deepcopy(config)
        changed.train.gradient_checkpointing = True
        yield ["train.gradient_checkpointing=true"], "recompute activations in the backward pass", changed
    start = _LADDER.index(parallelism.name) + 1 if parallelism.name in _LADDER else 1
    for name in _LADDER[start:]:
        changed = _with_parallelism(config, name, parallelism.nproc_per_node)
        yield [f"parallelism={name}", f"parallelism.nproc_per_node={parallelism.nproc_per_node}"], (
            f"same {parallelism.nproc_per_node} device(s) per node"
        ), changed
    if train.per_device_train_batch_size > 1:
        changed = copy.deepcopy(config)
        changed.train.per_device_train_batch_size = 1
        changed.train.gradient_accumulation_steps = train.gradient_accumulation_steps * train.per_device_train_batch_size
        yield ["train.per_device_train_batch_size=1", f"train.gradient_accumulation_steps={changed.train.gradient_accumulation_steps}"], (
            "same global batch"
        ), changed
    for count in _MORE_DEVICES:
        if count <= parallelism.nproc_per_node:
            continue
        for name in ("zero2", "zero3"):
            changed = _with_parallelism(config, name, count)
            yield [f"parallelism={name}", f"parallelism.nproc_per_node={count}"], f"{count} devices per node", changed
    length = train.max_length // 2
    while length >= _SHORTEST_MAX_LENGTH:
        changed = copy.deepcopy(config)
        changed.train.max_length = length
        yield [f"train.max_length={length}"], "longer samples are dropped (train.truncation_strategy)", changed
        length //= 2


def next_option(config: RecipeConfig, shape: memory.ModelShape, target: Target, usable_gib: float) -> Optional[Suggestion]:
    """The first of :func:`_candidates` whose estimate fits into ``usable_gib``, or None."""
    for overrides, why, changed in _candidates(config):
        estimate = estimate_for(changed, shape, target)
        if demand_gib(changed, estimate, target) <= usable_gib:
            return Suggestion(overrides, round(estimate.total_gib, 2), why)
    return None


AUTO = "auto"
AUTO_CHECKPOINTING_MARGIN = 1.15
"""``train.gradient_checkpointing=auto`` turns checkpointing off only when the demand without it,
times 1.15, fits the usable memory: the estimator's worst under-estimate against the H200
measurements was 9.0% (LoRA at 16,384 tokens, docs/memory.md), plus room for the allocator's
fragmentation."""


def decide_checkpointing(config: RecipeConfig, shape: memory.ModelShape, target: Target, usable_gib: float):
    """Decide ``train.gradient_checkpointing=auto``: off when the demand without it, times
    :data:`AUTO_CHECKPOINTING_MARGIN`, fits into ``usable_gib``, on otherwise.

    Returns:
        ``(config, without_gib)``: a copy of ``config`` with a boolean ``gradient_checkpointing``,
        and the demand without checkpointing in GiB.
    """
    decided = copy.deepcopy(config)
    decided.train.gradient_checkpointing = False
    without_gib = demand_gib(decided, estimate_for(decided, shape, target), target)
    decided.train.gradient_checkpointing = without_gib * AUTO_CHECKPOINTING_MARGIN > usable_gib
    return decided, without_gib


OUT_OF_MEMORY_SAVING = 0.9
"""After a real out-of-memory error the estimate was evidently too low for that device, so the
advice after one asks for an option estimated at most 90% of the failed configuration's."""


def after_out_of_memory(config: RecipeConfig) -> Optional[Suggestion]:
    """The first option (see :func:`next_option`) that fits the device and whose estimate is at most
    :data:`OUT_OF_MEMORY_SAVING` of ``config``'s own, or None.

    Raises:
        UserError: config.json cannot be read.
    """
    plan = make(config, [])
    return next_option(plan.config, plan.shape, plan.target, min(plan.usable_gib, OUT_OF_MEMORY_SAVING * plan.demand_gib))


def make(config: RecipeConfig, user_args: Sequence[str], model_dir: Optional[str] = None) -> Plan:
    """Build the :class:`Plan` of ``config``.

    Args:
        user_args: the user's overrides, repeated in the launch command.
        model_dir: a directory with config.json to use instead of fetching ``config.model``'s.

    Raises:
        UserError: config.json cannot be read or fetched.
    """
    model_dir = model_dir or models.fetch_config(config.model)
    shape = memory.model_shape(model_dir, config.train_type, config.lora, config.model.trust_remote_code)
    target = accelerators.resolve(config.plan.target, config.device)
    if config.plan.device_memory_gib is not None:
        memory_gib = config.plan.device_memory_gib
    elif target.memory_gib is not None:
        memory_gib = target.memory_gib
    else:
        memory_gib = devices.Device("cpu", 1).total_memory_gib()
    usable = memory_gib - target.reserve_gib
    without_checkpointing_gib = None
    if config.train.gradient_checkpointing == AUTO:
        config, without_checkpointing_gib = decide_checkpointing(config, shape, target, usable)
    estimate = estimate_for(config, shape, target)
    demand = demand_gib(config, estimate, target)
    return Plan(
        config=config,
        shape=shape,
        model_dir=model_dir,
        dtype=dtype_for(config, shape, target),
        target=target,
        memory_gib=memory_gib,
        reserve_gib=target.reserve_gib,
        estimate=estimate,
        demand_gib=demand,
        launch=launch_for(config, target.device_type, user_args),
        suggestion=None if demand <= usable else next_option(config, shape, target, usable),
        without_checkpointing_gib=without_checkpointing_gib,
    )


def _settings(plan: Plan) -> dict:
    config, shape = plan.config, plan.shape
    train, parallelism = config.train, config.parallelism
    world = parallelism.nproc_per_node * parallelism.nnodes
    settings = {
        "recipe": config.recipe,
        "description": config.description,
        "model": config.model.name_or_path,
        "model_hub": config.model.hub,
        "config_json": f"{plan.model_dir}/config.json",
        "architecture": {
            "model_type": shape.model_type, "layers": shape.num_layers, "hidden_size": shape.hidden_size,
            "attention_heads": shape.num_heads, "key_value_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
            "intermediate_size": shape.intermediate_size, "vocab_size": shape.vocab_size,
        },
        "parameters": shape.params,
        "trainable_parameters": shape.trainable_params,
        "train_type": config.train_type,
        "dtype": plan.dtype,
        "dataset": config.dataset.path,
        "dataset_hub": config.dataset.hub,
        "val_split_ratio": config.dataset.val_split_ratio,
        "num_train_epochs": train.num_train_epochs,
        "max_steps": train.max_steps,
        "learning_rate": train.learning_rate,
        "lr_scheduler_type": train.lr_scheduler_type,
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "global_batch_size": train.per_device_train_batch_size * train.gradient_accumulation_steps * world,
        "max_length": train.max_length,
        "gradient_checkpointing": train.gradient_checkpointing,
        "parallelism": parallelism.name,
        "nproc_per_node": parallelism.nproc_per_node,
        "nnodes": parallelism.nnodes,
        "world_size": world,
        "device": config.device,
    }
    if config.train_type == "lora":
        lora = config.lora
        settings["lora"] = {
            "r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
            "target_modules": lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules),
            "adapted_per_layer": [name for name, _ in shape.lora_inputs],
        }
    return settings


def to_dict(plan: Plan) -> dict:
    """The plan as one JSON-ready object (``plan.format=json``)."""
    return {
        "settings": _settings(plan),
        "reference": dict(plan.config.reference),
        "launch": {
            "environment": plan.launch.environment,
            "command": plan.launch.command,
            "shell": plan.launch.shell(),
            "workers": plan.launch.workers,
            "worker_environment": plan.launch.worker_environment,
        },
        "memory": plan.estimate.to_dict(),
        "device": {
            "target": plan.target.name,
            "label": plan.target.label,
            "memory_gib": round(plan.memory_gib, 2),
            "reserve_gib": plan.reserve_gib,
            "usable_gib": round(plan.usable_gib, 2),
            "demand_gib": round(plan.demand_gib, 3),
            "source": plan.target.source,
        },
        "fits": plan.fits,
        "suggestion": None if plan.suggestion is None else {
            "overrides": plan.suggestion.overrides, "total_gib": plan.suggestion.total_gib, "why": plan.suggestion.why,
        },
    }


def _reference_line(reference: dict) -> Optional[str]:
    if not reference:
        return None
    parts = []
    if reference.get("max_memory_gb_per_device") is not None:
        parts.append(f"{reference.get('devices', '?')} x {reference['max_memory_gb_per_device']} GB")
    if reference.get("runtime_hours") is not None:
        parts.append(f"{reference['runtime_hours']} h")
    return f"{', '.join(parts) or 'no figures'} ({reference.get('source', 'recipe metadata')})"


def render_text(plan: Plan) -> str:
    """The plan as the text ``stage=plan`` prints."""
    settings = _settings(plan)
    arch = settings["architecture"]
    config, estimate = plan.config, plan.estimate
    lines = [f"plan for {config.recipe}" + (f": {config.description}" if config.description else ""), "", "settings"]

    def row(name: str, value: str) -> None:
        lines.append(f"  {name:<15} {value}")

    row("model", f"{settings['model']} ({settings['model_hub']}); read {settings['config_json']}")
    row("architecture", f"{arch['model_type']}, {arch['layers']} layers, hidden {arch['hidden_size']}, "
        f"{arch['attention_heads']} heads / {arch['key_value_heads']} KV heads, intermediate {arch['intermediate_size']}, "
        f"vocab {arch['vocab_size']}")
    trainable = settings["trainable_parameters"]
    if config.train_type == "lora":
        row("parameters", f"{memory.format_count(settings['parameters'] - trainable)} base + "
            f"{memory.format_count(trainable)} LoRA (trainable)")
    else:
        row("parameters", f"{memory.format_count(settings['parameters'])}, all trainable")
    if "lora" in settings:
        lora = settings["lora"]
        row("lora", f"r {lora['r']}, alpha {lora['lora_alpha']}, dropout {lora['lora_dropout']}, "
            f"target {lora['target_modules']}: {', '.join(lora['adapted_per_layer'])}")
    row("dtype", plan.dtype)
    row("dataset", f"{settings['dataset']} ({settings['dataset_hub']}), validation split {settings['val_split_ratio']}")
    length = f"{settings['max_steps']} steps" if settings["max_steps"] > 0 else f"{settings['num_train_epochs']:g} epochs"
    row("training", f"{length}, learning rate {settings['learning_rate']:g} ({settings['lr_scheduler_type']}), "
        f"micro-batch {settings['per_device_train_batch_size']} x accumulation {settings['gradient_accumulation_steps']} "
        f"x {settings['world_size']} device(s) = global batch {settings['global_batch_size']}")
    checkpointing = "on" if settings["gradient_checkpointing"] else "off"
    if plan.without_checkpointing_gib is not None:
        checkpointing += (f" (auto: {plan.without_checkpointing_gib:.1f} GiB without it, x{AUTO_CHECKPOINTING_MARGIN}, "
                          f"{'does not fit' if settings['gradient_checkpointing'] else 'fits'} {plan.usable_gib:.1f} GiB usable)")
    row("sequence", f"max_length {settings['max_length']}, gradient checkpointing {checkpointing}")
    row("parallelism", f"{settings['parallelism']}: {settings['nproc_per_node']} process(es) per node x {settings['nnodes']} node(s) "
        f"= world size {settings['world_size']}")
    reference = _reference_line(plan.config.reference)
    if reference:
        row("reference", reference)

    lines += ["", "launch"]
    row("environment", " ".join(f"{k}={v}" for k, v in plan.launch.environment.items()) or "(none)")
    row("command", plan.launch.shell())
    if plan.launch.workers:
        row("workers", f"{shlex.join(plan.launch.workers)}  ({RUN_DIR}: the run directory)")
        row("worker env", " ".join(f"{k}={v}" for k, v in plan.launch.worker_environment.items()) + " (set by the launcher)")
    if config.parallelism.nnodes > 1:
        row("nodes", f"run the command on each of the {config.parallelism.nnodes} nodes with parallelism.node_rank=0..{config.parallelism.nnodes - 1}")

    lines += ["", "memory per device (estimate of peak allocated; formulas in docs/memory.md)"]
    for component in estimate.components.values():
        marker = "" if component.at_peak else "  [not live at the peak]"
        lines.append(f"  {component.label:<28} {component.gib:8.2f} GiB   {component.note}{marker}")
    other = estimate.optimizer_step_bytes if estimate.peak_phase == "forward/backward" else estimate.forward_backward_bytes
    lines.append(f"  {'total':<28} {estimate.total_gib:8.2f} GiB   peak in the {estimate.peak_phase} "
                 f"(the other phase: {other / memory.GIB:.2f} GiB)")
    if estimate.host_bytes:
        lines.append(f"  {'host RAM per node (offload)':<28} {estimate.host_bytes / memory.GIB:8.2f} GiB")

    lines += ["", "device"]
    row("target", f"{plan.target.label} ({plan.target.name}): {plan.memory_gib:.1f} GiB, "
        f"{plan.usable_gib:.1f} usable after a {plan.reserve_gib:g} GiB runtime reserve")
    need = f"{plan.demand_gib:.2f} GiB" + (" for all processes of a node" if plan.target.memory_gib is None else "")
    if plan.fits:
        row("verdict", f"fits: {need} of {plan.usable_gib:.1f} GiB ({100 * plan.demand_gib / plan.usable_gib:.0f}%)")
    else:
        row("verdict", f"does not fit: {need} > {plan.usable_gib:.1f} GiB")
        if plan.suggestion is not None:
            row("next option", f"{' '.join(plan.suggestion.overrides)} -> {plan.suggestion.total_gib:.2f} GiB per device "
                f"({plan.suggestion.why})")
        else:
            row("next option", "none of ZeRO-2/3, offload, 8 devices or a max_length down to "
                f"{_SHORTEST_MAX_LENGTH} fits; choose a device with more memory")
    return "\n".join(lines)

