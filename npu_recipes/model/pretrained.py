"""Finding, building and loading base models and tokenizers.

Model paths are resolved once by the runner (:func:`resolve_path`), so workers, later stages and
``resolved.yaml`` see a concrete local directory or hub id, and nothing is downloaded twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, NamedTuple, Optional, Tuple

from npu_recipes import atomic, paths
from npu_recipes.config.schema import LoraConfig, ModelConfig
from npu_recipes.errors import UserError
from npu_recipes.model import attention, kernels
from npu_recipes.runtime.devices import Device

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

def _build_tiny_qwen2(target: Path) -> None:
    from npu_recipes.model import tiny

    tiny.build(target)


def _tiny_family_builder(family: str) -> Callable[[Path], None]:
    def build(target: Path) -> None:
        from npu_recipes.model import tiny

        tiny.build_family(family, target)

    return build


TINY_FAMILIES = ("qwen3", "llama3", "glm4", "deepseek_r1_distill_qwen")
"""Families with a tiny test model besides Qwen2 (:data:`npu_recipes.model.tiny.FAMILIES`; a test holds the two together)."""

BUILDERS: Dict[str, Callable[[Path], None]] = {
    "tiny_qwen2": _build_tiny_qwen2,
    **{f"tiny_{family}": _tiny_family_builder(family) for family in TINY_FAMILIES},
}
"""Local model builders by name: ``model.builder=NAME`` creates ``model.name_or_path`` on first use
(inside the cache: conf/model/tiny_qwen2.yaml's ``${npu_cache:${.builder}-v1}``, so ``model.builder=tiny_llama3``
alone builds and loads ``tiny_llama3-v1``, never into another builder's directory)."""

BUILT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
"""Files every locally built model has; a cached build missing any of them is rebuilt."""



SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
"""config.json of the hub models the shipped recipes name, one directory each (``Org--Name``), for planning offline."""

_PATH_PREFIXES = ("/", "./", "../", "~")
"""A ``model.name_or_path`` starting so is a local path, never a hub id."""


def resolve_path(model: ModelConfig) -> str:
    """Return a local directory (built or downloaded) or hub id to load ``model`` from.

    * ``builder`` set and ``name_or_path`` in the cache (:func:`is_built`): build into ``name_or_path``
      if it does not exist yet (atomic, race-safe).
    * an existing local directory: its absolute path.
    * ``hub: modelscope``: ``modelscope.snapshot_download`` into ModelScope's cache.
    * otherwise: the Hugging Face id, left to ``from_pretrained``.

    Raises:
        UserError: unknown builder, modelscope missing, or the download failing.
    """
    if model.builder is not None and model.builder not in BUILDERS:
        raise UserError(
            f"model.builder={model.builder!r} is not a known builder",
            fix=f"use one of {sorted(BUILDERS)} or unset model.builder",
        )
    if is_built(model):
        target = Path(model.name_or_path).expanduser().absolute()
        missing = [name for name in BUILT_FILES if not (target / name).is_file()]
        if target.exists() and missing:
            log.warning("rebuilding %s: the cached model is incomplete (missing %s)", target, ", ".join(missing))
            shutil.rmtree(target, ignore_errors=True)
        if not target.exists():
            log.info("building the %s model into %s (first use; seconds)", model.builder, target)
            atomic.publish_directory(BUILDERS[model.builder], target)
        return str(target)
    local = Path(model.name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(
                f"model directory {local.absolute()} has no config.json, so it is not a transformers checkpoint",
                fix="point model.name_or_path at a directory saved with save_pretrained (config.json, weights, tokenizer)",
            )
        return str(local.absolute())
    if model.name_or_path.startswith(_PATH_PREFIXES):
        raise UserError(
            f"model directory {model.name_or_path!r} (model.name_or_path) does not exist",
            fix="pass an existing checkpoint directory, or a hub id such as Qwen/Qwen2-7B-Instruct",
        )
    if model.hub == "modelscope":
        try:
            from modelscope import snapshot_download
        except ImportError:
            raise UserError(
                f"model {model.name_or_path!r} is on ModelScope (model.hub=modelscope) but the modelscope package is missing",
                fix="pip install modelscope, or set model.name_or_path to a local directory",
            ) from None
        log.info("downloading %s from ModelScope into its cache (once; its progress bars follow)", model.name_or_path)
        try:
            return snapshot_download(model.name_or_path, revision=model.revision)
        except Exception as error:
            raise UserError(
                f"could not download {model.name_or_path!r} from ModelScope: {error}",
                fix="check the id and your network, or download it and pass model.name_or_path=DIR",
            ) from None
    return model.name_or_path


def is_built(model: ModelConfig) -> bool:
    """True when ``model`` is built locally by ``model.builder``: a builder is named and
    ``name_or_path`` lies in the cache (its default). Any other ``name_or_path`` (``model.name_or_path=X``
    over the default tiny model) is loaded as given, so that one override picks a real model."""
    if model.builder is None:
        return False
    return Path(model.name_or_path).expanduser().absolute().is_relative_to(paths.cache_dir())


def note_tiny_model(model: ModelConfig, dataset_builder: Optional[str]) -> None:
    """Say so when a locally built (random-init, demo-sized) model is about to train on the user's
    data (a dataset without a builder), and how to choose a real model."""
    if is_built(model) and dataset_builder is None:
        log.warning("training %s, the random-init demo model npu_recipes builds itself (about 140k parameters), on your data: "
                    "it shows that the pipeline works and learns little; pick a real model with model=qwen2_7b_instruct "
                    "(or another conf/model option) or model.name_or_path=HUB_ID_OR_DIR", model.builder)


def shipped_config_dir(name_or_path: str) -> Optional[Path]:
    """The shipped directory holding only the config.json of hub model ``name_or_path`` (``Org/Name``), if any."""
    candidate = SHIPPED_CONFIGS / name_or_path.replace("/", "--")
    return candidate if (candidate / "config.json").is_file() else None


def fetch_config(model: ModelConfig) -> str:
    """A local directory holding ``model``'s config.json, fetching only that file from a hub.

    * ``builder`` set or a local path: as :func:`resolve_path` (the tiny model is built locally; a
      directory must hold config.json);
    * a hub id: ``config.json`` alone, through ``huggingface_hub.hf_hub_download`` or ModelScope's
      ``model_file_download`` (``model.hub``), into their usual caches; when that fails (offline,
      or modelscope not installed) for a model whose config.json ships with npu_recipes
      (:func:`shipped_config_dir`), the shipped copy, with a warning saying so.

    Raises:
        UserError: the path does not exist or has no config.json, or the hub cannot give config.json
            and no copy ships (modelscope missing, offline, unknown id); the fix names ``model.name_or_path=DIR``.
    """
    if is_built(model) or Path(model.name_or_path).expanduser().is_dir() or model.name_or_path.startswith(_PATH_PREFIXES):
        return resolve_path(model)
    try:
        return _fetch_config_from_hub(model)
    except UserError as error:
        shipped = shipped_config_dir(model.name_or_path) if model.revision is None else None
        if shipped is None:
            raise
        log.warning("%s; using the copy of its config.json shipped with npu_recipes (%s)", error.message, shipped)
        return str(shipped)


def _fetch_config_from_hub(model: ModelConfig) -> str:
    offline_fix = "check the id and the network, or put the model's config.json into a directory and pass model.name_or_path=DIR"
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


_ROPE_SCALED = ("linear", "dynamic", "yarn", "longrope", "llama3")
"""``rope_scaling`` types that stretch the positions a model was trained on by their ``factor`` (transformers' names)."""


def context_length(model_dir: str) -> Tuple[int, str]:
    """The longest sequence (tokens) the model in ``model_dir`` places positions for, and how that
    follows from its config.json: ``max_position_embeddings``, or with ``rope_scaling`` (also
    ``rope_parameters``, transformers 5's name) of a stretching type its original length times
    ``factor`` when that is longer. Reads the JSON alone (no transformers, no torch).

    Raises:
        UserError: config.json is unreadable or has no ``max_position_embeddings``.
    """
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        positions = int(config["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} gives no max_position_embeddings ({type(error).__name__}: {error})",
                        fix="pass model.name_or_path=DIR of a decoder model whose config.json sets max_position_embeddings") from None
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind, factor = rope.get("rope_type") or rope.get("type"), rope.get("factor")
    if kind in _ROPE_SCALED and isinstance(factor, (int, float)) and factor > 1:
        original = int(rope.get("original_max_position_embeddings") or positions)
        scaled = int(original * factor)
        if scaled > positions:
            return scaled, f"{original} positions x rope_scaling factor {factor:g} ({kind}) in its config.json"
    return positions, f"max_position_embeddings={positions} in its config.json"


def check_max_length(max_length: int, model_dir: str, name_or_path: str) -> None:
    """Refuse a ``train.max_length`` longer than the model's context (:func:`context_length`): its
    positions beyond would be untrained, and the memory plan and packs would be sized for tokens
    that cannot occur.

    Raises:
        UserError: ``max_length`` exceeds the context, naming both numbers.
    """
    context, source = context_length(model_dir)
    if max_length > context:
        raise UserError(
            f"train.max_length={max_length} exceeds the context of {name_or_path}: {context} tokens ({source})",
            fix=f"pass train.max_length={context} or less (longer samples are dropped, or cut with train.truncation_strategy=truncate)",
        )


def shipped_model_id(directory: str) -> Optional[str]:
    """The hub id whose config.json copy :func:`shipped_config_dir` is ``directory``, or None."""
    path = Path(directory).expanduser().resolve()
    if path.parent != SHIPPED_CONFIGS.resolve() or not (path / "config.json").is_file():
        return None
    return path.name.replace("--", "/", 1)


def has_weights(directory: str) -> bool:
    """True when ``directory`` holds model weights (``*.safetensors`` or ``*.bin``), not only config.json."""
    return any(Path(directory).glob("*.safetensors")) or any(Path(directory).glob("*.bin"))


def select_dtype(model: ModelConfig, path: str, device: Device) -> torch.dtype:
    """The dtype to load weights in (:func:`dtype_choice` without its reason)."""
    return dtype_choice(model, path, device).dtype


class DtypeChoice(NamedTuple):
    """The weights' dtype and, when it is not what was asked for, why (else None)."""

    dtype: torch.dtype
    fallback: Optional[str]


def dtype_choice(model: ModelConfig, path: str, device: Device) -> DtypeChoice:
    """The dtype to load weights in, and why when it differs from the checkpoint's.

    ``auto`` follows the checkpoint's ``config.json`` (bf16 for Qwen2) on accelerators, falling
    back to fp16 where the device cannot compute in bf16 (:meth:`Device.supports_bf16`: a 910A, a
    pre-Ampere GPU; logged, and recorded in the manifest by the train stage), and uses fp32 on the
    CPU. An explicit ``model.torch_dtype`` (e.g. ``float32``, the seed's advice when bf16 gives NaN)
    always wins.
    """
    import torch

    if model.torch_dtype != "auto":
        return DtypeChoice(dtype_by_name(model.torch_dtype), None)
    if not device.is_accelerator:
        return DtypeChoice(torch.float32, None)
    declared = checkpoint_dtype(model, path)
    if declared == torch.bfloat16 and not device.supports_bf16():
        reason = f"{device.name()} does not support bf16 (the checkpoint's dtype): weights and compute in fp16"
        log.warning("model.torch_dtype=auto: %s; pass model.torch_dtype=float32 for full precision instead", reason)
        return DtypeChoice(torch.float16, reason)
    return DtypeChoice(declared, None)


def checkpoint_dtype(model: ModelConfig, path: str) -> torch.dtype:
    """The dtype the checkpoint's ``config.json`` declares (``dtype``/``torch_dtype``), fp32 when none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code, revision=model.revision)
    import torch

    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return getattr(torch, declared) if isinstance(declared, str) else declared


def dtype_by_name(name: str) -> torch.dtype:
    """``torch.bfloat16``/``float16``/``float32`` for a ``*.torch_dtype`` value other than ``auto``."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_tokenizer(model: ModelConfig, path: str):
    """Load the tokenizer; sets a pad token (eos) when the checkpoint defines none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code, revision=model.revision)
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load the tokenizer of {path}: {str(error).splitlines()[0]}",
            fix="check model.name_or_path (a complete local checkpoint, or a hub id reachable from here)",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer of {path} has no chat template, so conversations cannot be formatted",
            fix="use an Instruct/Chat checkpoint, or one whose tokenizer_config.json carries chat_template",
        )
    return tokenizer


def load_model(model: ModelConfig, path: str, dtype: torch.dtype, attn_implementation: Optional[str] = None):
    """Load ``AutoModelForCausalLM`` weights from ``path`` in ``dtype``: on the CPU (the Trainer moves them), or
    spread over the visible devices by ``model.device_map`` (e.g. ``auto``) when that is set.

    ``attn_implementation`` is transformers' (a training run's :class:`~npu_recipes.model.attention.AttentionChoice`);
    by default ``model.attn_implementation`` as a generating process uses it (``auto``: ``sdpa``).
    """
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attn_implementation or attention.for_generation(model.attn_implementation),
            trust_remote_code=model.trust_remote_code,
            revision=model.revision,
            device_map=model.device_map,
        )
    except OSError as error:
        raise UserError(
            f"cannot load model weights from {path}: {str(error).splitlines()[0]}",
            fix="check model.name_or_path (a complete local checkpoint, or a hub id reachable from here)",
        ) from None


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Wrap PEFT calls that build a ``PeftModel`` (``get_peft_model``, ``PeftModel.from_pretrained``).

    PEFT (0.21) reads transformers' deprecated ``is_gradient_checkpointing`` alias there, which
    warns (FutureWarning) in every LoRA run and every adapter load; the property's value is the
    same as under its new name, ``is_activation_checkpointing``, so the warning is filtered here only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model, lora: LoraConfig):
    """Wrap ``model`` with PEFT LoRA adapters as ``lora.*`` says (also used on meta-device models by the planner)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    with peft_quietly():
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


def _numel(parameter) -> int:
    # ZeRO-3 leaves an empty tensor in each process and records the full size as ds_numel.
    return getattr(parameter, "ds_numel", parameter.numel())


def load_for_training(model: ModelConfig, path: str, dtype: torch.dtype, lora: Optional[LoraConfig], kernel_choice: str,
                      attn_implementation: str, device_type: str):
    """Load the base model at ``path`` for training on ``device_type`` with transformers' ``attn_implementation``:
    no KV cache, wrapped with PEFT LoRA when ``lora`` is given (``train_type=lora``), with ``kernels``
    applied (:func:`npu_recipes.model.kernels.apply`); logs trainable and total parameters."""
    loaded = load_model(model, path, dtype, attn_implementation)
    loaded.config.use_cache = False
    if lora is not None:
        loaded = apply_lora(loaded, lora)
    kernels.apply(kernel_choice, loaded, device_type)
    trainable = sum(_numel(p) for p in loaded.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in loaded.parameters())
    log.info("%s: %s trainable of %s parameters (%.3f%%)", "lora" if lora is not None else "full", f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)
    return loaded
