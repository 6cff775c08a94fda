"""What ``stage=plan`` prints: the resolved settings, the launch command and the memory estimate,
as text or as one JSON object.

This is the one place below the stages that reads the whole :class:`~npu_recipes.config.schema.RecipeConfig`:
its job is to show all of it.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from npu_recipes.config.resolved import RESOLVED
from npu_recipes.config.schema import ModelConfig, ParallelismConfig, RecipeConfig
from npu_recipes.model import pretrained
from npu_recipes.plan import memory
from npu_recipes.plan.planner import AUTO_CHECKPOINTING_MARGIN, SHORTEST_MAX_LENGTH, Plan
from npu_recipes.runtime import devices
from npu_recipes.runtime.launch import LaunchPlan, runs_in_process, torchrun_arguments

RUN_DIR = "RUN_DIR"
"""Stands for the run directory in the printed worker command (``output_dir``; by default a new
``outputs/<recipe>/<time>``)."""


@dataclass(frozen=True)
class Launch:
    """How the run starts.

    Attributes:
        environment: variables for the user's command (the devices the run may use).
        command: what the user types.
        workers: the torchrun command line the runner starts (:mod:`npu_recipes.runtime.launch`), with
            ``RUN_DIR`` for the run directory; None when the stage runs in the launching process.
        worker_environment: what the runner sets for every worker (``DS_ACCELERATOR``).
        note: what to change before the command can run (see :func:`user_arguments`), or None.
    """

    environment: Dict[str, str]
    command: List[str]
    workers: Optional[List[str]]
    worker_environment: Dict[str, str]
    note: Optional[str] = None

    def shell(self) -> str:
        """The command with its environment, as one line to paste into a shell."""
        return " ".join([*(f"{key}={shlex.quote(value)}" for key, value in self.environment.items()), shlex.join(self.command)])


def user_arguments(argv: Sequence[str], model: ModelConfig) -> Tuple[List[str], Optional[str]]:
    """The arguments of the training command a plan prints, from the plan command's ``argv``, and a
    note when that command cannot train as it stands.

    ``stage=``, ``plan.*`` and options are dropped (with no argument left, ``stage=train``, since no
    argument at all runs the demo). A ``model.name_or_path`` that is a directory without weights
    (config.json only, as for planning offline) cannot train: one of the copies shipped with
    npu_recipes becomes its hub id again; any other gets a note saying to point it at the checkpoint.
    """
    arguments = [arg for arg in argv if not arg.startswith(("stage=", "plan.", "-"))] or ["stage=train"]
    local = Path(model.name_or_path).expanduser()
    if not local.is_dir() or pretrained.has_weights(str(local)):
        return arguments, None
    hub_id = pretrained.shipped_model_id(str(local))
    if hub_id is None:
        return arguments, (f"model.name_or_path={model.name_or_path} holds no weights (config.json only): point it at the "
                           "checkpoint before running this command")
    return [f"model.name_or_path={hub_id}" if arg.startswith("model.name_or_path=") else arg for arg in arguments], None


def launch_for(parallelism: ParallelismConfig, device_type: str, user_args: Sequence[str], output_dir: str,
               note: Optional[str] = None) -> Launch:
    """The :class:`Launch` of a run with ``parallelism`` on ``device_type`` machines writing ``output_dir``, built by the
    launcher's own functions (:func:`npu_recipes.runtime.launch.torchrun_arguments`,
    :meth:`npu_recipes.runtime.launch.LaunchPlan.command`)."""
    device = devices.Device(device_type, parallelism.nproc_per_node)
    environment = {}
    if device.visibility_variable:
        environment[device.visibility_variable] = ",".join(str(i) for i in range(parallelism.nproc_per_node))
    command = ["python", "-m", "npu_recipes", *user_args]
    if runs_in_process(parallelism):
        return Launch(environment, command, None, {}, note)
    workers = LaunchPlan(device, parallelism.world_size, False, torchrun_arguments(parallelism, output_dir)).command(
        Path(RUN_DIR) / RESOLVED)
    return Launch(environment, command, ["python", *workers[1:]], device.worker_environment(), note)


def _settings(config: RecipeConfig, plan: Plan) -> dict:
    shape = plan.shape
    train, parallelism = config.train, config.parallelism
    world = parallelism.world_size
    settings = {
        "recipe": config.recipe,
        "description": config.description,
        "model": config.model.name_or_path,
        "model_hub": "local" if Path(config.model.name_or_path).expanduser().is_dir() else config.model.hub,
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
        "gradient_checkpointing": plan.setting.gradient_checkpointing,
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


def to_dict(config: RecipeConfig, plan: Plan, launch: Launch) -> dict:
    """The plan of ``config`` as one JSON-ready object (``plan.format=json``)."""
    return {
        "settings": _settings(config, plan),
        "reference": dict(config.reference),
        "launch": {
            "environment": launch.environment,
            "command": launch.command,
            "shell": launch.shell(),
            "note": launch.note,
            "workers": launch.workers,
            "worker_environment": launch.worker_environment,
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


def render_text(config: RecipeConfig, plan: Plan, launch: Launch) -> str:
    """The plan of ``config`` as the text ``stage=plan`` prints."""
    settings = _settings(config, plan)
    arch = settings["architecture"]
    estimate = plan.estimate
    lines = [f"plan for {config.recipe}" + (f": {config.description}" if config.description else ""), "", "settings"]

    def row(name: str, value: str) -> None:
        lines.append(f"  {name:<15} {value}")

    where = "local directory" if settings["model_hub"] == "local" else settings["model_hub"]
    row("model", f"{settings['model']} ({where}); read {settings['config_json']}")
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
    if plan.checkpointing is not None:
        checkpointing += (f" (auto: {plan.checkpointing.without_checkpointing_gib:.1f} GiB without it, x{AUTO_CHECKPOINTING_MARGIN}, "
                          f"{'does not fit' if settings['gradient_checkpointing'] else 'fits'} {plan.usable_gib:.1f} GiB usable)")
    row("sequence", f"max_length {settings['max_length']}, gradient checkpointing {checkpointing}")
    row("parallelism", f"{settings['parallelism']}: {settings['nproc_per_node']} process(es) per node x {settings['nnodes']} node(s) "
        f"= world size {settings['world_size']}")
    reference = _reference_line(config.reference)
    if reference:
        row("reference", reference)

    lines += ["", "launch"]
    row("environment", " ".join(f"{k}={v}" for k, v in launch.environment.items()) or "(none)")
    row("command", launch.shell())
    if launch.note:
        row("note", launch.note)
    if launch.workers:
        row("workers", f"{shlex.join(launch.workers)}  ({RUN_DIR}: the run directory)")
        row("worker env", " ".join(f"{k}={v}" for k, v in launch.worker_environment.items()) + " (set by the launcher)")
    if config.parallelism.nnodes > 1:
        row("nodes", f"run the same command on each of the {config.parallelism.nnodes} nodes, in any order, with "
            f"parallelism.node_rank=0 (NODE_RANK=0) on one of them and 1..{config.parallelism.nnodes - 1} on the others, "
            "or let plan.launcher=slurm|kubernetes write the job file")

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
                f"{SHORTEST_MAX_LENGTH} fits; choose a device with more memory")
    return "\n".join(lines)

