"""Fused kernels (``kernels=auto|none|npu|liger``) and the checks that a chosen kernel or attention can run here.

* ``auto`` (the default): ``npu`` where a Qwen2-family model trains on an NPU (:func:`patchable`), else nothing.
* ``npu``: torch_npu's fused RMSNorm (``npu_rms_norm``), rotary embedding (``npu_rotary_mul``) and
  SwiGLU (``npu_swiglu``) replace Qwen2's Python implementations in the loaded model.
* ``liger``: the Liger kernels (liger-kernel package, Triton, CUDA only) through transformers' own
  switch ``TrainingArguments(use_liger_kernel=True)``: RoPE, RMSNorm, SwiGLU and the fused linear
  cross-entropy that never materialises the logits.

Attention is chosen per device by :mod:`npu_recipes.model.attention` (``model.attn_implementation=auto``);
on an NPU, transformers routes ``flash_attention_2`` to torch_npu's ``npu_fusion_attention``.

A kernel whose package or device is missing raises :class:`UserError` before anything loads; it never
falls back silently. All torch_npu imports of the package live here and in :mod:`npu_recipes.runtime.devices`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict

from npu_recipes.errors import UserError
from npu_recipes.runtime.devices import Device

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LIGER_KERNEL_CONFIG = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True, "cross_entropy": False}
"""Keyword arguments of Liger's ``apply_liger_kernel_to_<model>`` (passed as ``TrainingArguments.liger_kernel_config``)."""

# model_type -> the transformers module whose RMSNorm/MLP classes and apply_rotary_pos_emb are replaced.
_PATCHABLE_MODELS = {"qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "Qwen2MLP")}


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


def check(kernels: str, attn_implementation: str, device: Device) -> None:
    """Check that ``kernels`` and ``model.attn_implementation`` can run on ``device``.

    Raises:
        UserError: ``kernels=npu`` off an NPU; ``kernels=liger`` without the liger-kernel package or a
            CUDA device; ``flash_attention_2`` on a CPU, or on CUDA without the flash-attn package;
            ``flash_attention_3`` anywhere but CUDA with flash-attn-3 installed; ``flex_attention`` on the CPU
            (no backward there).
    """
    if kernels == "npu" and device.type != "npu":
        raise UserError(
            f"kernels=npu runs torch_npu's fused kernels on an Ascend NPU, but this run's device is {device.type}",
            fix="choose kernels=none here (kernels=liger on CUDA), or run on an Ascend machine",
        )
    if kernels == "liger":
        if _missing("liger_kernel"):
            raise UserError(
                "kernels=liger needs the liger-kernel package, which is not installed",
                fix="pip install liger-kernel (Triton kernels for CUDA GPUs), or choose kernels=none",
            )
        if device.type != "cuda":
            raise UserError(
                f"kernels=liger runs Triton kernels on CUDA GPUs only, but this run's device is {device.type}",
                fix="choose kernels=none here (kernels=npu on Ascend)",
            )
    if attn_implementation == "flash_attention_3" and device.type == "npu":
        raise UserError(
            "model.attn_implementation=flash_attention_3 has no Ascend kernel (transformers maps only flash_attention_2 "
            "to torch_npu's npu_fusion_attention)",
            fix="use model.attn_implementation=auto (flash_attention_2 on an NPU when packing) or flash_attention_2",
        )
    if attn_implementation == "flash_attention_3" and (device.type != "cuda" or _missing("flash_attn_interface")):
        raise UserError(
            f"model.attn_implementation=flash_attention_3 needs a CUDA GPU with the flash-attn-3 package "
            f"(flash_attn_interface), but this run's device is {device.type}"
            + ("" if device.type != "cuda" else " and the package is not installed"),
            fix="use model.attn_implementation=auto (sdpa, or one varlen call per layer for packs on CUDA)",
        )
    if attn_implementation == "flex_attention" and device.type == "cpu":
        raise UserError(
            "model.attn_implementation=flex_attention cannot train on the CPU: torch's FlexAttention has no CPU backward",
            fix="use model.attn_implementation=auto (sdpa) or eager on the CPU",
        )
    if attn_implementation == "flash_attention_2":
        if device.type == "cpu":
            raise UserError(
                "model.attn_implementation=flash_attention_2 needs an NPU or a CUDA GPU, but this run's device is cpu",
                fix="use model.attn_implementation=sdpa (or eager) on the CPU",
            )
        if device.type == "cuda" and _missing("flash_attn"):
            raise UserError(
                "model.attn_implementation=flash_attention_2 on CUDA needs the flash-attn package, which is not installed",
                fix="pip install flash-attn --no-build-isolation, or use model.attn_implementation=sdpa",
            )


OPTIMIZER_PACKAGES = (
    (("adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_", "rmsprop_bnb"), "bitsandbytes", "bitsandbytes"),
    (("galore_",), "galore_torch", "galore-torch"),
    (("apollo_",), "apollo_torch", "apollo-torch"),
    (("lomo", "adalomo"), "lomo_optim", "lomo-optim"),
    (("grokadamw",), "grokadamw", "grokadamw"),
    (("schedule_free_",), "schedulefree", "schedulefree"),
    (("adamw_torch_4bit", "adamw_torch_8bit"), "torchao", "torchao"),
    (("adamw_anyprecision",), "torchdistx", "torchdistx"),
    (("adamw_torch_xla",), "torch_xla", "torch-xla"),
    (("stable_adamw",), "optimi", "torch-optimi"),
)
"""``train.optim`` names (exact, or prefixes ending in ``_``) -> (module transformers imports for them,
the pip package): transformers' ``Trainer.get_optimizer_cls_and_kwargs`` needs it when the optimizer is built."""


def check_optimizer(optim: str, device: Device) -> None:
    """Check that ``train.optim`` can be built here, before anything loads (transformers would fail only
    when it creates the optimizer, after the model has loaded).

    Raises:
        UserError: its package is missing, or ``adamw_torch_npu_fused`` off an NPU.
    """
    if optim == "adamw_torch_npu_fused" and device.type != "npu":
        raise UserError(f"train.optim=adamw_torch_npu_fused is torch_npu's fused AdamW, but this run's device is {device.type}",
                        fix="use train.optim=adamw_torch_fused (the default), which runs on every device with a kernel")
    for names, module, package in OPTIMIZER_PACKAGES:
        if any(optim == name or (name.endswith("_") and optim.startswith(name)) for name in names) and _missing(module):
            raise UserError(f"train.optim={optim} needs the {package} package, which is not installed",
                            fix=f"pip install {package}, or use train.optim=adamw_torch_fused (the default)")


def training_arguments(kernels: str) -> Dict[str, Any]:
    """Extra ``TrainingArguments`` for ``kernels``: transformers applies Liger itself when asked to."""
    if kernels == "liger":
        return {"use_liger_kernel": True, "liger_kernel_config": dict(LIGER_KERNEL_CONFIG)}
    return {}


@dataclass(frozen=True)
class FusedOps:
    """The three fused operations the Qwen2 patch calls, with torch_npu's signatures and semantics.

    Attributes:
        rms_norm: ``(x (..., hidden), weight (hidden,), eps) -> (..., hidden)``: ``x / sqrt(mean(x²) + eps) * weight``.
        rotary_mul: ``(x (batch, heads, seq, head_dim), cos, sin (batch, 1, seq, head_dim)) -> like x``:
            ``x·cos + rotate_half(x)·sin``.
        swiglu: ``(x (..., 2·inner)) -> (..., inner)``: ``silu(first half) · second half``.
    """

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    rotary_mul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    swiglu: Callable[[torch.Tensor], torch.Tensor]


def npu_ops() -> FusedOps:
    """torch_npu's fused kernels (``npu_rms_norm`` returns the output and 1/rms; the output is kept)."""
    import torch_npu

    return FusedOps(
        rms_norm=lambda x, weight, eps: torch_npu.npu_rms_norm(x, weight, epsilon=eps)[0],
        rotary_mul=torch_npu.npu_rotary_mul,
        swiglu=lambda x: torch_npu.npu_swiglu(x, dim=-1),
    )


def patch_model(model: torch.nn.Module, ops: FusedOps) -> int:
    """Route a loaded Qwen2 model (PEFT-wrapped or not) through ``ops``; returns how many modules were patched.

    RMSNorm and MLP modules get a new ``forward`` on the instance (LoRA layers inside the MLP keep
    working: the MLP still calls its ``gate_proj``/``up_proj``/``down_proj`` modules). Rotary embedding
    is a module-level function in transformers, so ``apply_rotary_pos_emb`` is replaced in the
    model's modeling module, for every model of that type in this process.

    Raises:
        UserError: the model type has no fused patch, or its MLP activation is not SiLU.
    """
    import torch
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = base.config.model_type
    if model_type not in _PATCHABLE_MODELS:
        raise UserError(
            f"kernels=npu has fused kernels for {', '.join(sorted(_PATCHABLE_MODELS))} models; this model is {model_type!r}",
            fix="choose kernels=none for this model",
        )
    if base.config.hidden_act not in ("silu", "swish"):
        raise UserError(
            f"kernels=npu fuses SwiGLU, but this model's activation is {base.config.hidden_act!r}",
            fix="choose kernels=none for this model",
        )
    module_name, norm_class, mlp_class = _PATCHABLE_MODELS[model_type]
    modeling = importlib.import_module(module_name)
    patched = 0
    for module in base.modules():
        if isinstance(module, getattr(modeling, norm_class)):
            module.forward = types.MethodType(lambda self, x: ops.rms_norm(x, self.weight, self.variance_epsilon), module)
            patched += 1
        elif isinstance(module, getattr(modeling, mlp_class)):
            module.forward = types.MethodType(
                lambda self, x: self.down_proj(ops.swiglu(torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1))), module
            )
            patched += 1

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return ops.rotary_mul(q, cos, sin), ops.rotary_mul(k, cos, sin)

    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
    return patched + 1


def patchable(model: torch.nn.Module) -> bool:
    """True when :func:`patch_model` has fused kernels for ``model`` (PEFT-wrapped or not): a Qwen2-family
    model type with a SiLU MLP."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config.model_type in _PATCHABLE_MODELS and base.config.hidden_act in ("silu", "swish")


def apply(kernels: str, model: torch.nn.Module, device_type: str) -> None:
    """Patch a model loaded for training on ``device_type`` (after :func:`check`).

    ``npu`` patches it (or raises, for a model without fused kernels); ``auto`` patches where that is
    known to work, a :func:`patchable` model on an NPU, and leaves anything else as it is; ``none``
    and ``liger`` (applied by the Trainer) change nothing here. Only training calls this: a generating
    process never runs these patches (``npu_rotary_mul`` does not take the decode step's shapes).

    Raises:
        UserError: ``kernels=npu`` on a model :func:`patch_model` has no kernels for.
    """
    if kernels == "npu" or (kernels == "auto" and device_type == "npu" and patchable(model)):
        patched = patch_model(model, npu_ops())
        log.info("kernels=%s: torch_npu's fused RMSNorm, rotary embedding and SwiGLU in %d places", kernels, patched)
    elif kernels == "auto":
        log.info("kernels=auto: transformers' own implementations (torch_npu's fused kernels apply to Qwen2-family "
                 "models on an NPU; this run: %s, %s)", type(model).__name__, device_type)
