"""Loading a model for generation: a base model, a merged model, or a base plus PEFT adapters.

Shared by the merge, infer and serve stages; the adapters come parsed and checked
(:mod:`npu_recipes.infer.adapters`), their base model resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

from npu_recipes.config.resolved import RESOLVED
from npu_recipes.config.schema import ModelConfig
from npu_recipes.infer.adapters import Adapter, check_adapters_fit
from npu_recipes.model import pretrained
from npu_recipes.run import manifest
from npu_recipes.runtime.devices import Device

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedModel:
    """A model ready for ``generate``: on its device, in eval mode, tokenizer padding on the left.

    ``model`` is a ``PeftModel`` when ``adapters`` is non-empty (every adapter loaded under its
    name, the first one active), else the plain ``PreTrainedModel``.
    """

    model: Any
    tokenizer: Any
    base: ModelConfig
    adapters: List[Adapter] = field(default_factory=list)


def training_run_dir(adapters: List[Adapter], model_name_or_path: str) -> Optional[Path]:
    """The training run behind the model to load, or None when there is none.

    In order: the (first) adapter's run directory; for a merged model at ``model_name_or_path``, the
    run its manifest.json names (``training_run``, written by the merge stage); for a full
    fine-tuning checkpoint (``model.name_or_path=RUN/checkpoint-N``), its parent when that holds resolved.yaml.

    Raises:
        UserError: a merged model's manifest.json is not a JSON object.
    """
    if adapters:
        return adapters[0].run_dir
    model_dir = Path(str(model_name_or_path)).expanduser().absolute()
    if not model_dir.is_dir():
        return None
    recorded = manifest.training_run_of(model_dir)
    if recorded:
        return Path(recorded)
    return model_dir.parent if (model_dir.parent / RESOLVED).is_file() else None


def load(base: ModelConfig, adapters: List[Adapter], device: Device, local_rank: int = 0,
         dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Load the base (or merged) model ``base`` (:func:`npu_recipes.infer.adapters.base_model_config`)
    plus ``adapters`` for generation.

    ``dtype`` overrides the weights' dtype (default :func:`npu_recipes.model.pretrained.select_dtype`:
    fp32 on CPU, the checkpoint's dtype on accelerators).

    Raises:
        UserError: as :func:`npu_recipes.infer.adapters.check_adapters_fit` and
            :func:`npu_recipes.model.pretrained.resolve_path`.
    """
    path = pretrained.resolve_path(base)
    check_adapters_fit(adapters, base, path)
    tokenizer = pretrained.load_tokenizer(base, path)
    tokenizer.padding_side = "left"
    model = pretrained.load_model(base, path, dtype or pretrained.select_dtype(base, path, device))
    if adapters:
        from peft import PeftModel

        with pretrained.peft_quietly():
            model = PeftModel.from_pretrained(model, str(adapters[0].path), adapter_name=adapters[0].name)
            for adapter in adapters[1:]:
                model.load_adapter(str(adapter.path), adapter_name=adapter.name)
        model.set_adapter(adapters[0].name)
    model.to(device.torch_device(local_rank)).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, base=base, adapters=adapters)


def stack_adapters(loaded: LoadedModel) -> None:
    """Make every loaded adapter active at once, so their LoRA deltas add up (as the merge stage
    merges them); with one adapter or none this changes nothing.

    The infer stage stacks; the serve stage keeps one adapter active per request instead.
    """
    if len(loaded.adapters) > 1:
        loaded.model.base_model.set_adapter([a.name for a in loaded.adapters], inference_mode=True)
