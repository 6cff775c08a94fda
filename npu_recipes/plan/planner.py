"""The planner: a training run's memory per device against a device type, the gradient-checkpointing
decision under ``auto``, and the next option that fits when the run does not.

It needs no accelerator and reads nothing of the model but config.json
(:func:`npu_recipes.model.pretrained.fetch_config`). ``stage=plan`` prints what it finds
(:mod:`npu_recipes.plan.report`); the train stage asks it whether to recompute activations on the
device it has, and what to advise after an out-of-memory error.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from npu_recipes.config.schema import LoraConfig, ModelConfig, ParallelismConfig, PlanConfig, TrainConfig
from npu_recipes.errors import UserError
from npu_recipes.model import pretrained
from npu_recipes.plan import memory, targets
from npu_recipes.plan.memory import Estimate, ModelShape, TrainSetting
from npu_recipes.plan.targets import Target
from npu_recipes.run import resume
from npu_recipes.runtime import devices

log = logging.getLogger(__name__)

AUTO = "auto"

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
_MORE_DEVICES = (2, 4, 8)
SHORTEST_MAX_LENGTH = 256
"""The shortest ``train.max_length`` the planner suggests (halving from the configured one)."""

AUTO_CHECKPOINTING_MARGIN = 1.15
"""``train.gradient_checkpointing=auto`` turns checkpointing off only when the demand without it,
times 1.15, fits the usable memory: the estimator's worst under-estimate against the H200
measurements was 9.0% (LoRA at 16,384 tokens, docs/memory.md), plus room for the allocator's
fragmentation."""

OUT_OF_MEMORY_SAVING = 0.9
"""After a real out-of-memory error the estimate was evidently too low for that device, so the
advice after one asks for an option estimated at most 90% of the failed configuration's."""


@dataclass(frozen=True)
class Suggestion:
    """An option that fits: the overrides to add and the estimate with them (GiB per device)."""

    overrides: List[str]
    total_gib: float
    why: str


@dataclass(frozen=True)
class CheckpointingDecision:
    """What ``train.gradient_checkpointing=auto`` decided, and on which numbers (GiB per device).

    Attributes:
        enabled: recompute activations in the backward pass.
        without_checkpointing_gib: the demand without checkpointing.
        usable_gib: the device's memory less its runtime reserve.
        margin: :data:`AUTO_CHECKPOINTING_MARGIN`.
    """

    enabled: bool
    without_checkpointing_gib: float
    usable_gib: float
    margin: float = AUTO_CHECKPOINTING_MARGIN


@dataclass(frozen=True)
class Plan:
    """A run's memory against one device type. Memory figures in GiB per device unless named otherwise.

    ``setting`` holds what the estimate assumed, with ``train.gradient_checkpointing=auto`` decided
    (``checkpointing`` says how). ``demand_gib`` is what must fit into ``usable_gib``: the per-device
    estimate on accelerators; on the CPU all processes of a node share the RAM, so it is
    ``nproc_per_node`` estimates plus what offload keeps in host memory.
    """

    shape: ModelShape
    model_dir: str
    setting: TrainSetting
    target: Target
    memory_gib: float
    estimate: Estimate
    demand_gib: float
    suggestion: Optional[Suggestion]
    checkpointing: Optional[CheckpointingDecision] = None

    @property
    def dtype(self) -> str:
        """The weights' dtype the estimate assumed."""
        return self.setting.dtype

    @property
    def reserve_gib(self) -> float:
        return self.target.reserve_gib

    @property
    def usable_gib(self) -> float:
        return self.memory_gib - self.target.reserve_gib

    @property
    def fits(self) -> bool:
        return self.demand_gib <= self.usable_gib


def dtype_for(torch_dtype: str, shape: ModelShape, target: Target) -> str:
    """The weights' dtype on ``target``: an explicit ``model.torch_dtype``, else the target's rule."""
    if torch_dtype != "auto":
        return torch_dtype
    return target.auto_dtype or shape.declared_dtype


def demand_gib(setting: TrainSetting, estimate: Estimate, target: Target) -> float:
    """GiB that must fit into one device of ``target`` (all processes of a node on the CPU)."""
    if target.memory_gib is None:
        return (setting.nproc_per_node * estimate.total_bytes + estimate.host_bytes) / memory.GIB
    return estimate.total_gib


def _demand(shape: ModelShape, setting: TrainSetting, target: Target) -> Tuple[Estimate, float]:
    estimate = memory.estimate(shape, setting, target)
    return estimate, demand_gib(setting, estimate, target)


def with_parallelism(setting: TrainSetting, name: str, nproc_per_node: int) -> TrainSetting:
    """``setting`` under ``parallelism=name parallelism.nproc_per_node=N`` (the same number of nodes)."""
    zero_stage, offload_optimizer, offload_param = PARALLELISM_SETTINGS[name]
    nodes = setting.world_size // setting.nproc_per_node
    return dataclasses.replace(
        setting, zero_stage=zero_stage, offload_optimizer=offload_optimizer != "none", offload_param=offload_param != "none",
        nproc_per_node=nproc_per_node, world_size=nproc_per_node * nodes,
    )


def _candidates(setting: TrainSetting, parallelism: str) -> Iterator[Tuple[List[str], str, TrainSetting]]:
    """Changes that lower per-device memory, least disruptive first: (overrides, why, changed setting)."""
    nproc = setting.nproc_per_node
    if not setting.gradient_checkpointing:
        yield ["train.gradient_checkpointing=true"], "recompute activations in the backward pass", dataclasses.replace(
            setting, gradient_checkpointing=True)
    start = _LADDER.index(parallelism) + 1 if parallelism in _LADDER else 1
    for name in _LADDER[start:]:
        yield [f"parallelism={name}", f"parallelism.nproc_per_node={nproc}"], f"same {nproc} device(s) per node", with_parallelism(
            setting, name, nproc)
    if setting.micro_batch > 1:
        accumulation = setting.gradient_accumulation_steps * setting.micro_batch
        yield (["train.per_device_train_batch_size=1", f"train.gradient_accumulation_steps={accumulation}"], "same global batch",
               dataclasses.replace(setting, micro_batch=1, gradient_accumulation_steps=accumulation))
    for count in _MORE_DEVICES:
        if count <= nproc:
            continue
        for name in ("zero2", "zero3"):
            yield [f"parallelism={name}", f"parallelism.nproc_per_node={count}"], f"{count} devices per node", with_parallelism(
                setting, name, count)
    length = setting.max_length // 2
    while length >= SHORTEST_MAX_LENGTH:
        yield ([f"train.max_length={length}"], "longer samples are dropped (train.truncation_strategy)",
               dataclasses.replace(setting, max_length=length))
        length //= 2


def next_option(shape: ModelShape, setting: TrainSetting, parallelism: str, target: Target, usable_gib: float) -> Optional[Suggestion]:
    """The first change (least disruptive first) whose demand fits into ``usable_gib``, or None.

    Args:
        parallelism: the ``parallelism`` option ``setting`` runs under (the ladder starts above it).
    """
    for overrides, why, changed in _candidates(setting, parallelism):
        estimate, demand = _demand(shape, changed, target)
        if demand <= usable_gib:
            return Suggestion(overrides, round(estimate.total_gib, 2), why)
    return None


def decide_checkpointing(shape: ModelShape, setting: TrainSetting, target: Target, usable_gib: float) -> CheckpointingDecision:
    """Decide ``train.gradient_checkpointing=auto``: off when the demand without it, times
    :data:`AUTO_CHECKPOINTING_MARGIN`, fits into ``usable_gib``, on otherwise."""
    _, without_gib = _demand(shape, dataclasses.replace(setting, gradient_checkpointing=False), target)
    return CheckpointingDecision(without_gib * AUTO_CHECKPOINTING_MARGIN > usable_gib, without_gib, usable_gib)


def log_decision(decision: CheckpointingDecision, device_name: str) -> None:
    """Say what ``train.gradient_checkpointing=auto`` decided on ``device_name``, and on which numbers."""
    log.info("gradient checkpointing auto: %s (estimate without it %.2f GiB x %.2f %s %.2f GiB usable on %s)",
             "on" if decision.enabled else "off", decision.without_checkpointing_gib, decision.margin,
             ">" if decision.enabled else "<=", decision.usable_gib, device_name)


def device_memory_gib(target: Target, configured_gib: Optional[float]) -> float:
    """Memory of one device of ``target`` in GiB: ``plan.device_memory_gib`` when set, else the
    target's, else (``cpu``) this machine's RAM."""
    if configured_gib is not None:
        return configured_gib
    if target.memory_gib is not None:
        return target.memory_gib
    return devices.Device("cpu", 1).total_memory_gib()


def make(*, model: ModelConfig, train_type: str, lora: LoraConfig, train: TrainConfig, parallelism: ParallelismConfig,
         device: str, options: PlanConfig, model_dir: Optional[str] = None) -> Plan:
    """Plan a training run described by these config sections for the device type ``options.target``
    resolves to (``auto``: by ``device``, see :data:`npu_recipes.plan.targets.DEFAULT_FOR_DEVICE`).

    Args:
        device: the ``device`` setting (or the device type a run actually has).
        model_dir: a directory with config.json to use instead of fetching ``model``'s.

    Raises:
        UserError: config.json cannot be read or fetched; ``train.max_length`` exceeds the model's context.
    """
    model_dir = model_dir or pretrained.fetch_config(model)
    pretrained.check_max_length(train.max_length, model_dir, model.name_or_path)
    shape = memory.model_shape(model_dir, train_type, lora, model.trust_remote_code)
    target = targets.resolve(options.target, device)
    memory_gib = device_memory_gib(target, options.device_memory_gib)
    usable = memory_gib - target.reserve_gib
    setting = TrainSetting.from_sections(train_type, dtype_for(model.torch_dtype, shape, target), train, lora, parallelism)
    decision = None
    if train.gradient_checkpointing == AUTO:
        decision = decide_checkpointing(shape, setting, target, usable)
        setting = dataclasses.replace(setting, gradient_checkpointing=decision.enabled)
    estimate, demand = _demand(shape, setting, target)
    return Plan(
        shape=shape, model_dir=model_dir, setting=setting, target=target, memory_gib=memory_gib, estimate=estimate,
        demand_gib=demand, suggestion=None if demand <= usable else next_option(shape, setting, parallelism.name, target, usable),
        checkpointing=decision,
    )


def after_out_of_memory(plan: Plan, parallelism: str) -> Optional[Suggestion]:
    """The first option (see :func:`next_option`) that fits the device and whose estimate is at most
    :data:`OUT_OF_MEMORY_SAVING` of the plan's own, or None."""
    return next_option(plan.shape, plan.setting, parallelism, plan.target, min(plan.usable_gib, OUT_OF_MEMORY_SAVING * plan.demand_gib))


def for_device(*, model: ModelConfig, train_type: str, lora: LoraConfig, train: TrainConfig,
               parallelism: ParallelismConfig, options: PlanConfig, device: devices.Device) -> Plan:
    """:func:`make` for the device a training process has: its type and, on an accelerator, its real
    memory rather than the recipe's target card (the host's RAM on the CPU)."""
    if device.is_accelerator:
        options = dataclasses.replace(options, device_memory_gib=device.total_memory_gib())
    return make(model=model, train_type=train_type, lora=lora, train=train, parallelism=parallelism, device=device.type,
                options=options)


def out_of_memory(error: BaseException, step: int, plan: Optional[Plan], parallelism: str) -> UserError:
    """The error for a device out-of-memory failure at optimizer ``step`` (0-based count of steps
    done), naming the next option that fits ``plan`` (planned for the device that failed, see
    :func:`for_device`; None when config.json could not be read) per :func:`after_out_of_memory`."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    suggestion = after_out_of_memory(plan, parallelism) if plan is not None else None
    advice = (
        f"the plan stage's next option that fits: {' '.join(suggestion.overrides)} ({suggestion.why}; "
        f"estimated {suggestion.total_gib} GiB per device)"
        if suggestion else "the plan stage finds no smaller option on this device"
    )
    if suggestion and not all(resume.may_change(override.split("=")[0]) for override in suggestion.overrides):
        advice += " in a new output_dir (this run's checkpoints resume only with the settings that saved them)"
    return UserError(
        f"device out of memory at training step {step + 1}: {first_line}",
        fix=f"{advice}; see every estimate with the same command plus stage=plan",
    )
