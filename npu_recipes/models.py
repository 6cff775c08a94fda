"""Finding, building and loading base models and tokenizers.

Model paths are resolved once by the runner (:func:`resolve_path`), so workers, later stages and
``resolved.yaml`` see a concrete local directory or hub id, and nothing is downloaded twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import torch

from npu_recipes import atomic, tiny_model
from npu_recipes.devices import Device
from npu_recipes.errors import UserError
from npu_recipes.schema import LoraConfig, ModelConfig

BUILDERS: Dict[str, Callable[[Path], None]] = {"tiny_qwen2": tiny_model.build}
"""Local model builders by name: ``model.builder=NAME`` creates ``model.name_or_path`` on first use."""

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_path(model: ModelConfig) -> str:
    """Return a local directory (built or downloaded) or hub id to load ``model`` from.

    * ``builder`` set: build into ``name_or_path`` if it does not exist yet (atomic, race-safe).
    * an existing local directory: its absolute path.
    * ``hub: modelscope``: ``modelscope.snapshot_download`` into ModelScope's cache.
    * otherwise: the Hugging Face id, left to ``from_pretrained``.

    Raises:
        UserError: unknown builder, modelscope missing, or the download failing.
    """
    if model.builder is not None:
        if model.builder not in BUILDERS:
            raise UserError(
                f"model.builder={model.builder!r} is not a known builder",
                fix=f"use one of {sorted(BUILDERS)} or unset model.builder",
            )
        target = Path(model.name_or_path).expanduser().absolute()
        if not (target / "config.json").is_file():
            atomic.publish_directory(BUILDERS[model.builder], target)
        return str(target)
    local = Path(model.name_or_path).expanduser()
    if local.is_dir():
        return str(local.absolute())
    if model.hub == "modelscope":
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise UserError(
                f"model {model.name_or_path!r} is on ModelScope (model.hub=modelscope) but the modelscope package is missing",
                fix="pip install modelscope, or set model.name_or_path to a local directory",
            ) from None
        try:
            return snapshot_download(model.name_or_path, revision=model.revision)
        except Exception as error:
            raise UserError(
                f"could not download {model.name_or_path!r} from ModelScope: {error}",
                fix="check the id and your network, or download it and pass model.name_or_path=DIR",
            ) from None
    return model.name_or_path


def fetch_config(model: ModelConfig) -> str:
    """A local directory holding ``model``'s config.json, fetching only that file from a hub.

    * ``builder`` set or a local directory: as :func:`resolve_path` (the tiny model is built locally);
    * a hub id: ``config.json`` alone, through ``huggingface_hub.hf_hub_download`` or ModelScope's
      ``model_file_download`` (``model.hub``), into their usual caches.

    Raises:
        UserError: the directory has no config.json, modelscope is missing, or the download fails
            (offline, unknown id); the fix names ``model.name_or_path=DIR``.
    """
    offline_fix = "check the id and the network, or put the model's config.json into a directory and pass model.name_or_path=DIR"
    local = Path(model.name_or_path).expanduser()
    if model.builder is not None or local.is_dir():
        directory = Path(resolve_path(model))
        if not (directory / "config.json").is_file():
            raise UserError(f"{directory} (model.name_or_path) has no config.json", fix="point model.name_or_path at a model directory")
        return str(directory)
    if model.hub == "modelscope":
        try:
            from modelscope.hub.file_download import model_file_download
        except ImportError:
            raise UserError(
                f"model {model.name_or_path!r} is on ModelScope (model.hub=modelscope) but the modelscope package is missing",
                fix="pip install modelscope, or pass model.hub=huggingface (Qwen publishes the same ids there), "
                "or model.name_or_path=DIR with the model's config.json",
            ) from None
        try:
            return str(Path(model_file_download(model.name_or_path, "config.json", revision=model.revision)).parent)
        except Exception as error:
            raise UserError(f"could not fetch config.json of {model.name_or_path!r} from ModelScope: {error}", fix=offline_fix) from None
    from huggingface_hub import hf_hub_download

    try:
        return str(Path(hf_hub_download(model.name_or_path, "config.json", revision=model.revision)).parent)
    except Exception as error:
        raise UserError(
            f"could not fetch config.json of {model.name_or_path!r} from the Hugging Face Hub: {type(error).__name__}: {error}",
            fix=offline_fix,
        ) from None


def select_dtype(model: ModelConfig, path: str, device: Device) -> torch.dtype:
    """The dtype to load weights in.

    ``auto`` follows the checkpoint's ``config.json`` (bf16 for Qwen2) on accelerators, falling
    back to fp16 where bf16 is unsupported, and uses fp32 on the CPU. An explicit
    ``model.torch_dtype`` (e.g. ``float32``, the seed's advice when bf16 gives NaN) always wins.
    """
    if model.torch_dtype != "auto":
        return _DTYPES[model.torch_dtype]
    if device.type == "cpu":
        return torch.float32
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code, revision=model.revision)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    declared = _DTYPES.get(declared, declared) if isinstance(declared, str) else declared
    if declared == torch.bfloat16 and not device.supports_bf16():
        return torch.float16
    return declared


def load_tokenizer(model: ModelConfig, path: str):
    """Load the tokenizer; sets a pad token (eos) when the checkpoint defines none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code, revision=model.revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of {path} has no chat template, so conversations cannot be formatted",
            fix="use an Instruct/Chat checkpoint, or one whose tokenizer_config.json carries chat_template",
        )
    return tokenizer


def load_model(model: ModelConfig, path: str, dtype: torch.dtype):
    """Load ``AutoModelForCausalLM`` weights from ``path`` in ``dtype`` on the CPU (the Trainer moves them)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=model.attn_implementation,
        trust_remote_code=model.trust_remote_code,
        revision=model.revision,
    )


def apply_lora(model, lora: LoraConfig):
    """Wrap ``model`` with PEFT LoRA adapters as ``lora.*`` says (also used on meta-device models by the planner)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return get_peft_model(
        model,
        PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=target,
            bias=lora.bias,
            task_type="CAUSAL_LM",
        ),
    )
