"""Per-device memory estimate for fine-tuning a decoder-only transformer with the Trainer.

The estimate predicts what ``max_memory_allocated`` reports at the peak of a training run: the
bytes of live tensors, not the allocator's cache and not the runtime's own reservation. Every
formula, its source and what it was checked against is in docs/memory.md; the short version:

* weights, gradients, optimizer states: per parameter, after the ZeRO paper (Rajbhandari et al.
  2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models", section 3):
  mixed-precision Adam under DeepSpeed keeps 2 + 2 + K bytes per parameter with K = 12 (fp32
  master weights, momentum, variance), ZeRO-2 divides gradients and optimizer states by the world
  size N, ZeRO-3 the weights too. Without DeepSpeed, ``torch.optim.AdamW`` keeps its two moments
  in the parameter's dtype and there is no master copy.
* activations: the tensors autograd saves per token and layer, counted the way Korthikanti et al.
  2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4.1) count GPT's
  ``34 s b h``, redone for Qwen2/Llama layers (RMSNorm with an fp32 upcast, grouped-query
  attention through SDPA, SwiGLU, PEFT LoRA dropout) and checked tensor by tensor with
  ``torch.autograd.graph.saved_tensors_hooks``.
* logits and loss: transformers' ``ForCausalLMLoss`` upcasts the logits to fp32; the peak, in the
  backward of the cross-entropy, holds three fp32 tensors of the vocabulary size per token.

The estimate is the larger of two moments: the forward/backward peak (activations and logits
live) and the optimizer step (its temporaries live, activations freed).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from npu_recipes.errors import UserError
from npu_recipes.plan.targets import Target

GIB = 1024**3

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# transformers' Qwen2/Llama layer names; linears in one group read the same input tensor.
_SHARED_INPUT = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
                 "gate_proj": "mlp input", "up_proj": "mlp input"}

# DeepSpeed settings the estimate assumes: those npu_recipes.runtime.deepspeed_config generates (overlap_comm
# on accelerators, reduce_bucket_size "auto" = hidden_size^2 as transformers fills it in) and
# DeepSpeed's own defaults.
OVERLAP_COMM_BUCKET_FACTOR = 4.5  # DeepSpeed docs: overlap_comm uses 4.5x reduce_bucket_size
STAGE3_MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed default


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model: its config.json numbers and parameter counts.

    Built by :func:`model_shape` from a meta-device instance (no weights read); counts are in
    parameters (elements), dimensions in elements per token.
    """

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    declared_dtype: str
    params: int
    trainable_params: int
    largest_trainable: int
    largest_module_params: int
    layer_params: int
    lora_rank: int = 0
    lora_inputs: Tuple[Tuple[str, int], ...] = field(default_factory=tuple)

    @property
    def query_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class TrainSetting:
    """The settings that move memory: what is trained, in which dtype, how it is split, per step.

    ``dtype`` is the weights' dtype (``bfloat16``/``float16``/``float32``), which is also the
    activations' dtype. ``world_size`` is the number of processes (devices) in total and
    ``nproc_per_node`` those on one machine (for host memory under offload). ``zero_stage`` is
    DeepSpeed's ZeRO stage (None: no DeepSpeed; several processes then run DDP), with
    ``offload_optimizer`` / ``offload_param`` moving optimizer states / parameters to host memory.
    With ``packing`` a micro-batch is ``micro_batch`` packs of ``max_length`` tokens in one row.
    """

    train_type: str
    dtype: str
    world_size: int
    micro_batch: int
    max_length: int
    gradient_checkpointing: bool
    gradient_accumulation_steps: int
    lora_dropout: float
    zero_stage: Optional[int] = None
    offload_optimizer: bool = False
    offload_param: bool = False
    nproc_per_node: int = 1
    packing: bool = False

    @classmethod
    def from_sections(cls, train_type: str, dtype: str, train, lora, parallelism) -> "TrainSetting":
        """The setting of a run's ``train.*``, ``lora.*`` and ``parallelism.*`` sections (:mod:`npu_recipes.config.schema`)
        with weights in ``dtype``; ``train.gradient_checkpointing`` as given (``auto`` is decided by the planner)."""
        return cls(
            train_type=train_type,
            dtype=dtype,
            world_size=parallelism.world_size,
            micro_batch=train.per_device_train_batch_size,
            max_length=train.max_length,
            gradient_checkpointing=train.gradient_checkpointing,
            gradient_accumulation_steps=train.gradient_accumulation_steps,
            lora_dropout=lora.lora_dropout,
            zero_stage=parallelism.zero_stage,
            offload_optimizer=parallelism.offload_optimizer_device != "none",
            offload_param=parallelism.offload_param_device != "none",
            nproc_per_node=parallelism.nproc_per_node,
            packing=train.packing,
        )

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch at the longest (every sample or pack ``max_length`` tokens)."""
        return self.micro_batch * self.max_length

    @property
    def padded(self) -> bool:
        """True when a micro-batch holds several padded rows (an attention mask, KV heads repeated)."""
        return self.micro_batch > 1 and not self.packing


@dataclass(frozen=True)
class Component:
    """One line of the estimate: ``bytes`` per device, and whether it is live at the peak."""

    label: str
    bytes: float
    at_peak: bool
    note: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass(frozen=True)
class Estimate:
    """The estimate for one device: components, both phases, the peak, and host memory under offload.

    ``total_bytes`` is the larger of ``forward_backward_bytes`` and ``optimizer_step_bytes``;
    ``host_bytes`` is host RAM per node that ZeRO-3 offload keeps (0 without offload).
    """

    components: Dict[str, Component]
    activations_checkpointing_on: float
    activations_checkpointing_off: float
    forward_backward_bytes: float
    optimizer_step_bytes: float
    peak_phase: str
    host_bytes: float

    @property
    def total_bytes(self) -> float:
        return max(self.forward_backward_bytes, self.optimizer_step_bytes)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def to_dict(self) -> dict:
        """JSON-ready: every size in GiB (rounded to 3 decimals) with its note."""
        return {
            "components": {
                key: {"label": c.label, "gib": round(c.gib, 3), "at_peak": c.at_peak, "note": c.note}
                for key, c in self.components.items()
            },
            "activations_gib": {
                "checkpointing_on": round(self.activations_checkpointing_on / GIB, 3),
                "checkpointing_off": round(self.activations_checkpointing_off / GIB, 3),
            },
            "forward_backward_gib": round(self.forward_backward_bytes / GIB, 3),
            "optimizer_step_gib": round(self.optimizer_step_bytes / GIB, 3),
            "peak_phase": self.peak_phase,
            "total_gib": round(self.total_gib, 3),
            "host_offload_gib": round(self.host_bytes / GIB, 3),
        }


def _architecture_numbers(config) -> dict:
    """Dimensions from a transformers ``PretrainedConfig``; UserError when a decoder key is missing."""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [key for key in required if getattr(config, key, None) is None]
    if missing:
        raise UserError(
            f"config.json of model_type {getattr(config, 'model_type', '?')!r} lacks {', '.join(missing)}, "
            "which the memory estimate needs",
            fix="the planner knows decoder-only models with Llama/Qwen2-style config.json keys",
        )
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }


def _declared_dtype(config) -> str:
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(declared).replace("torch.", "")


def model_shape(model_dir: str, train_type: str, lora, trust_remote_code: bool = False) -> ModelShape:
    """Read ``model_dir``/config.json and count parameters on the meta device (no weights, no memory).

    For ``train_type=lora`` the meta model is wrapped exactly as the train stage wraps it
    (:func:`npu_recipes.model.pretrained.apply_lora`), so trainable counts and adapted layers are PEFT's own.
    Results are cached per process (the catalogue plans every recipe).

    Args:
        model_dir: a directory holding at least config.json.
        train_type: ``lora`` or ``full``.
        lora: the ``lora.*`` settings (:class:`npu_recipes.config.schema.LoraConfig`).

    Raises:
        UserError: config.json is unreadable or lacks the decoder dimensions.
    """
    targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    lora_key = (lora.r, lora.lora_alpha, lora.lora_dropout, targets, lora.bias) if train_type == "lora" else None
    return _model_shape(str(model_dir), lora_key, trust_remote_code)


@functools.lru_cache(maxsize=None)
def _model_shape(model_dir: str, lora_key: Optional[tuple], trust_remote_code: bool) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from npu_recipes.config.schema import LoraConfig
    from npu_recipes.model import pretrained

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {model_dir}/config.json: {error}", fix="point model.name_or_path at a directory with config.json") from None
    numbers = _architecture_numbers(config)
    # Building the skeleton draws from torch's random generator (initialisers run on meta tensors too);
    # a train stage that plans gradient_checkpointing=auto between seeding and building its model must
    # get the same initial LoRA weights as one that does not plan, or one that planned earlier in the process.
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        if lora_key is not None:
            r, alpha, dropout, targets, bias = lora_key
            targets = targets if isinstance(targets, str) else list(targets)
            model = pretrained.apply_lora(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                                            bias=bias))
    named = list(model.named_parameters())
    layer_pattern = re.compile(r"(^|\.)layers\.0\.")
    lora_inputs = tuple(
        (name.rsplit(".", 1)[-1], module.in_features)
        for name, module in model.named_modules()
        if layer_pattern.search(name + ".") and hasattr(module, "lora_A") and hasattr(module, "in_features")
    )
    return ModelShape(
        **numbers,
        declared_dtype=_declared_dtype(config),
        params=sum(p.numel() for _, p in named),
        trainable_params=sum(p.numel() for _, p in named if p.requires_grad),
        largest_trainable=max((p.numel() for _, p in named if p.requires_grad), default=0),
        largest_module_params=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        layer_params=sum(p.numel() for name, p in named if layer_pattern.search(name)),
        lora_rank=lora_key[0] if lora_key is not None else 0,
        lora_inputs=lora_inputs,
    )


def activation_bytes_per_token(shape: ModelShape, setting: TrainSetting, target: Target) -> Dict[str, float]:
    """Bytes autograd keeps per token: one decoder layer, the final norm, and the shared RoPE tables.

    Per layer (a = activation bytes, h = hidden, q/kv = query/key-value widths, I = intermediate):

    * each RMSNorm: 4h + 4 (its fp32 upcast of the input, saved by ``pow``, and the reciprocal
      root of the variance); full training adds 2ah
      (normalised input and output, saved for the norm weight's and the next linear's gradient);
    * attention: a(q + 2kv + q) for rotated queries, keys, values and the SDPA output, plus a 4-byte
      log-sum-exp per head; with padding (micro-batch > 1 without packing) transformers repeats the
      KV heads for SDPA, kv -> q;
    * SwiGLU MLP: 3aI (gate output, its SiLU, up output), full training adds aI (down's input);
    * LoRA, per adapted linear with in_features n: (a + m)n for the dropout's output and mask
      (m = 1 byte on fused kernels, a on the CPU), plus a*r for lora_B's input; without dropout the
      adapters save their shared input once per group (q/k/v, gate/up).

    Returns: ``{"layer", "final_norm", "rope", "layer_input"}`` in bytes per token.
    """
    a = DTYPE_BYTES[setting.dtype]
    full = setting.train_type == "full"
    h, intermediate = shape.hidden_size, shape.intermediate_size
    kv = shape.query_dim if setting.padded else shape.kv_dim
    norm = 4 * h + 4 + (2 * a * h if full else 0)
    attention = a * (2 * shape.query_dim + 2 * kv) + 4 * shape.num_heads
    mlp = 3 * a * intermediate + (a * intermediate if full else 0)
    lora = 0.0
    if shape.lora_inputs:
        mask = 1 if target.fused_dropout else a
        if setting.lora_dropout > 0:
            lora = sum((a + mask) * n for _, n in shape.lora_inputs)
        else:
            lora = sum(a * n for n in {_SHARED_INPUT.get(name, name): n for name, n in shape.lora_inputs}.values())
        lora += a * shape.lora_rank * len(shape.lora_inputs)
    return {
        "layer": 2 * norm + attention + mlp + lora,
        "final_norm": norm,
        "rope": 2 * a * shape.head_dim,
        "layer_input": a * h,
    }


# Bytes per token of the batch itself: input_ids, labels, attention_mask, position ids and the
# shifted labels of the loss, int64 each.
_BATCH_BYTES_PER_TOKEN = 5 * 8
# fp32 tensors of vocabulary size per token at the cross-entropy's backward: the saved log-softmax,
# the gradient arriving from nll_loss and the gradient it returns.
_LOSS_FP32_COPIES = 3
# A checkpointed layer's backward holds, beside the recomputed activations, gradients of about one
# hidden-size and two intermediate-size tensors (the MLP's two branches); fitted to the tiny model's
# CPU measurements, the only ones where a recomputed layer outweighs the logits (docs/memory.md).
_BACKWARD_GRADIENTS = (1, 2)


def format_count(number: float) -> str:
    """A parameter count as people write it in notes: 7.62e9, 20.2e6, 4096."""
    for exponent in (9, 6, 3):
        if number >= 10**exponent:
            return f"{number / 10**exponent:.3g}e{exponent}"
    return str(int(number))


def estimate(shape: ModelShape, setting: TrainSetting, target: Target) -> Estimate:
    """Estimate the peak allocated memory of one device (process) for ``setting`` on ``target``.

    Raises nothing; every input is assumed validated by :func:`npu_recipes.config.validate`.
    """
    w = DTYPE_BYTES[setting.dtype]
    n = setting.world_size
    total, trainable = shape.params, shape.trainable_params
    frozen = total - trainable
    stage = setting.zero_stage
    full = setting.train_type == "full"

    notes: Dict[str, str] = {}
    if stage is None:
        # PEFT keeps adapters in fp32 under a half-precision model (autocast_adapter_dtype=True).
        adapter = w if full else 4
        weights = frozen * w + trainable * adapter
        gradients = trainable * adapter
        states = 2 * trainable * adapter
        step_temporaries = trainable * adapter if target.foreach_optimizer else 2 * shape.largest_trainable * adapter
        buckets = trainable * adapter if n > 1 else 0
        notes["weights"] = f"{format_count(total)} params x {w} B" if full else (
            f"{format_count(frozen)} frozen params x {w} B + {format_count(trainable)} adapter params x {adapter} B"
        )
        notes["gradients"] = f"{format_count(trainable)} trainable x {adapter} B"
        notes["optimizer_states"] = f"AdamW: 2 moments x {adapter} B per trainable parameter (torch keeps them in the parameter dtype)"
        notes["optimizer_step"] = (
            "foreach AdamW: one temporary the size of a moment" if target.foreach_optimizer
            else "per-tensor AdamW: two temporaries the size of the largest trainable tensor"
        )
        overhead_note = "DDP gradient buckets (a second copy of the gradients) + " if buckets else ""
        gathered = 0.0
        host = 0.0
    else:
        # DeepSpeed casts the module to bf16/fp16 and keeps an fp32 master partition for the
        # optimizer (none in fp32); the Trainer's torch AdamW steps on the fp32 partitions.
        master = 4 if w < 4 else 0
        k = master + 8
        partitions = f"/ {n} (ZeRO-{stage} partitions)"
        weights = 0.0 if setting.offload_param else total * w / (n if stage == 3 else 1)
        gradients = 0.0 if setting.offload_optimizer else trainable * w / (n if stage >= 2 else 1)
        states = 0.0 if setting.offload_optimizer else trainable * k / n
        sqrt_temporary = 4 if target.foreach_optimizer else 8  # one fp32 partition, or two on the CPU
        step_temporaries = 0.0 if setting.offload_optimizer else (4 + sqrt_temporary) * trainable / n
        buckets = (OVERLAP_COMM_BUCKET_FACTOR if target.overlap_comm else 1) * shape.hidden_size**2 * w
        gathered = min(shape.largest_module_params + shape.layer_params, STAGE3_MAX_LIVE_PARAMETERS) * w if stage == 3 else 0.0
        host = (
            (total * w if setting.offload_param else 0) + (trainable * (4 + k) if setting.offload_optimizer else 0)
        ) * setting.nproc_per_node / n
        notes["weights"] = f"{format_count(total)} params x {w} B" + (
            " offloaded to host RAM" if setting.offload_param else (f" / {n} (ZeRO-3 partitions)" if stage == 3 else ", replicated")
        )
        notes["gradients"] = f"{format_count(trainable)} trainable x {w} B " + (
            "reduced into host RAM" if setting.offload_optimizer else (partitions if stage >= 2 else "(replicated)")
        )
        notes["optimizer_states"] = f"{k} B per trainable parameter ({'fp32 master + ' if master else ''}2 fp32 moments) " + (
            "in host RAM" if setting.offload_optimizer else partitions
        )
        notes["optimizer_step"] = (
            "the step runs on the host (DeepSpeed CPU Adam)" if setting.offload_optimizer
            else "fp32 gradient partition + AdamW's sqrt(exp_avg_sq) on the partition"
        )
        overhead_note = f"DeepSpeed buckets ({OVERLAP_COMM_BUCKET_FACTOR if target.overlap_comm else 1:g} x hidden_size^2) + " + (
            "ZeRO-3 gathered parameters (largest module + one layer) + " if stage == 3 else ""
        )

    per_token = activation_bytes_per_token(shape, setting, target)
    tokens = setting.tokens
    mask = setting.micro_batch * setting.max_length**2 if setting.padded else 0
    logits = tokens * (_LOSS_FP32_COPIES * 4 * shape.vocab_size + _BATCH_BYTES_PER_TOKEN)
    rope = tokens * per_token["rope"]
    backward = _BACKWARD_GRADIENTS[0] * w * shape.hidden_size + _BACKWARD_GRADIENTS[1] * w * shape.intermediate_size
    recompute = tokens * (per_token["layer"] + backward)
    loss_phase = logits + tokens * per_token["final_norm"]
    stored_on = tokens * shape.num_layers * per_token["layer_input"] + rope + mask
    activations_on = stored_on + max(0.0, recompute - loss_phase) + tokens * per_token["final_norm"]
    activations_off = tokens * (shape.num_layers * per_token["layer"] + per_token["final_norm"]) + rope + mask
    activations = activations_on if setting.gradient_checkpointing else activations_off

    overhead = buckets + gathered + target.overhead_gib * GIB
    gradients_in_pass = gradients if setting.gradient_accumulation_steps > 1 else 0.0
    forward_backward = weights + states + gradients_in_pass + activations + logits + overhead
    optimizer_step = weights + states + gradients + step_temporaries + overhead
    peak = "forward/backward" if forward_backward >= optimizer_step else "optimizer step"
    in_pass = peak == "forward/backward"

    layers = shape.num_layers
    if setting.gradient_checkpointing:
        activation_note = f"checkpointing on: {layers} layer inputs" + (
            " + one recomputed layer" if recompute > loss_phase else ""
        ) + f" (off: {activations_off / GIB:.2f} GiB)"
    else:
        activation_note = f"checkpointing off: {layers} layers (on: {activations_on / GIB:.2f} GiB)"
    activation_note = f"{tokens} tokens, " + activation_note
    components = {
        "weights": Component("weights", weights, True, notes["weights"]),
        "gradients": Component(
            "gradients", gradients, not in_pass or gradients_in_pass > 0,
            notes["gradients"] + ("" if gradients_in_pass or not in_pass else "; freed before the next forward (no accumulation)"),
        ),
        "optimizer_states": Component("optimizer states", states, True, notes["optimizer_states"]),
        "activations": Component("activations", activations, in_pass, activation_note),
        "logits_and_loss": Component(
            "logits and loss", logits, in_pass,
            f"{tokens} tokens x {shape.vocab_size} vocab x {_LOSS_FP32_COPIES} fp32 copies (cross-entropy backward)",
        ),
        "optimizer_step": Component("optimizer step temporaries", step_temporaries, not in_pass, notes["optimizer_step"]),
        "framework_overhead": Component(
            "framework overhead", overhead, True, f"{overhead_note}{target.overhead_gib:g} GiB fixed allowance"
        ),
    }
    return Estimate(
        components=components,
        activations_checkpointing_on=activations_on,
        activations_checkpointing_off=activations_off,
        forward_backward_bytes=forward_backward,
        optimizer_step_bytes=optimizer_step,
        peak_phase=peak,
        host_bytes=host,
    )
