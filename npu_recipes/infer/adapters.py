"""Adapters for generation: PEFT checkpoints named by ``adapters=``, checked before anything loads.

With ``adapters`` set, the base model is the one the adapter was trained on: taken from the
training run's ``resolved.yaml`` (the checkpoint's parent directory) when there is one, else from
the adapter's ``adapter_config.json`` (``base_model_name_or_path``). A run that used a local or
built model is therefore never downloaded. A ``model.*`` key given on the command line wins over
what those files say (e.g. ``model.device_map=null`` after training with ``auto``).

``adapters=RUN/best`` stands for the best checkpoint of the training run in ``RUN``, as its
manifest names it (``best_checkpoint``, see :class:`npu_recipes.run.manifest.BestCheckpointRecord`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, List, Optional

from npu_recipes.config.resolved import RESOLVED, load_resolved
from npu_recipes.config.schema import ModelConfig
from npu_recipes.errors import UserError
from npu_recipes.run import manifest
from npu_recipes.run.checkpoints import PREFIX, complete

BEST = "best"
"""``adapters=RUN/best``: the best checkpoint of the run in ``RUN``."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
"""PEFT's adapter weight files (safetensors, or the older pickle format)."""


@dataclass(frozen=True)
class Adapter:
    """One PEFT adapter checkpoint: its PEFT adapter name, absolute directory, and the
    ``base_model_name_or_path`` its adapter_config.json names (read once, when parsed)."""

    name: str
    path: Path
    base_model_name_or_path: str

    @property
    def run_dir(self) -> Optional[Path]:
        """The training run directory holding this checkpoint (it has resolved.yaml), if any."""
        parent = self.path.parent
        return parent if (parent / RESOLVED).is_file() else None


def _read_adapter_config(path: Path) -> dict:
    config_path = path / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(
            f"adapters: {config_path} is unreadable ({error})",
            fix="restore the checkpoint directory from the training run (its adapter_config.json is written by PEFT)",
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("base_model_name_or_path"), str):
        raise UserError(
            f"adapters: {config_path} names no base model (base_model_name_or_path is missing)",
            fix="restore the checkpoint directory from the training run (its adapter_config.json is written by PEFT)",
        )
    return config


def _safe_name(text: str) -> str:
    # PEFT adapter names become torch ModuleDict keys, which may not contain dots.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _best_of(path: Path) -> Path:
    """``RUN/best`` as the checkpoint directory the run's manifest names as its best."""
    run = path.parent
    if not (run / manifest.MANIFEST).is_file():
        raise UserError(f"adapters: {path} names the best checkpoint of a training run, but {run} has no manifest.json",
                        fix="pass the run directory of a training run (where manifest.json is), or a checkpoint as adapters=RUN/checkpoint-N")
    best = manifest.read(run).best_checkpoint
    saved = ", ".join(c.name for c in complete(run)) or "none"
    if best is None:
        raise UserError(
            f"adapters: {run} names no best checkpoint (its manifest gets one when a saved step is evaluated: "
            "dataset.val_split_ratio above 0)",
            fix=f"pass one of its checkpoints as adapters={run}/checkpoint-N (saved: {saved})",
        )
    checkpoint = run / f"{PREFIX}{best.step}"
    if not checkpoint.is_dir():
        raise UserError(
            f"adapters: {path} is {checkpoint.name} ({best.metric} {best.value:.4f}), which is no longer in {run}",
            fix=f"pass one of its checkpoints as adapters={run}/checkpoint-N (saved: {saved})",
        )
    return checkpoint


def _checked_adapter(name: str, raw_path: Any) -> Adapter:
    path = Path(str(raw_path)).expanduser().absolute()
    if path.name == BEST and not path.exists() and (path.parent / RESOLVED).is_file():
        path = _best_of(path)
    if path.is_file():
        raise UserError(
            f"adapters: {path} is a file, not a checkpoint directory",
            fix=f"pass the directory that holds it: adapters={path.parent}",
        )
    if not path.is_dir():
        raise UserError(f"adapters: {path} does not exist", fix="pass adapters=RUN_DIR/checkpoint-N of a LoRA training run")
    if not (path / ADAPTER_CONFIG).is_file():
        if (path / "config.json").is_file():
            raise UserError(
                f"adapters: {path} is a full model checkpoint, not a PEFT adapter (it has config.json, no {ADAPTER_CONFIG})",
                fix=f"load it as the model instead: model.name_or_path={path}",
            )
        checkpoints = complete(path)
        if checkpoints:
            newest = checkpoints[-1]
            kind = "a LoRA" if (newest / ADAPTER_CONFIG).is_file() else "a full fine-tuning"
            fix = (f"pass one of its checkpoints: adapters={newest}" if kind == "a LoRA"
                   else f"load a checkpoint as the model instead: model.name_or_path={newest}")
            raise UserError(
                f"adapters: {path} is the run directory of {kind} run, not a checkpoint "
                f"(checkpoints: {', '.join(c.name for c in checkpoints)})",
                fix=fix,
            )
        raise UserError(
            f"adapters: {path} holds no adapter files ({ADAPTER_CONFIG} is missing)",
            fix="pass the checkpoint-N directory of a LoRA run (it holds adapter_config.json and adapter_model.safetensors)",
        )
    if not any((path / weights).is_file() for weights in ADAPTER_WEIGHTS):
        raise UserError(
            f"adapters: {path} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})",
            fix="copy the whole checkpoint directory from the training run; a LoRA checkpoint needs both files",
        )
    return Adapter(name=_safe_name(name), path=path, base_model_name_or_path=_read_adapter_config(path)["base_model_name_or_path"])


def parse_adapters(value: Any) -> List[Adapter]:
    """Normalise the ``adapters`` key into a checked list of :class:`Adapter`.

    Accepts None (no adapter), one path (named ``default``), a list of paths (named after their
    checkpoint directories, made unique), or a name -> path mapping (names kept, made PEFT-safe).

    Raises:
        UserError: a path does not exist, is a file, a full checkpoint or a run directory, holds no
            adapter files, or has an unreadable adapter_config.json.
    """
    if value in (None, "", [], {}):
        return []
    if isinstance(value, (str, Path)):
        return [_checked_adapter("default", value)]
    if isinstance(value, dict):
        parsed = [_checked_adapter(str(name), path) for name, path in value.items()]
        clashes = sorted({a.name for a in parsed if sum(b.name == a.name for b in parsed) > 1})
        if clashes:
            given = ", ".join(repr(str(name)) for name in value if _safe_name(str(name)) in clashes)
            raise UserError(
                f"adapters: the names {given} become the same PEFT adapter name {clashes[0]!r} "
                "(names keep letters, digits, _ and -; anything else becomes _)",
                fix="give every adapter a name that differs in its letters, digits, _ or -",
            )
        return parsed
    adapters, seen = [], set()
    for raw_path in value:
        name = base = _safe_name(Path(str(raw_path)).name)
        suffix = 2
        while name in seen:
            name, suffix = f"{base}_{suffix}", suffix + 1
        seen.add(name)
        adapters.append(_checked_adapter(name, raw_path))
    return adapters


def _explicit_fields(explicit: Collection[str]) -> List[str]:
    """``ModelConfig`` fields set one by one on the command line (``model.KEY=VALUE``; a ``model=OPTION``
    group choice names a model to train, not the base of an adapter)."""
    return [f.name for f in dataclasses.fields(ModelConfig) if f"model.{f.name}" in explicit]


def base_model_config(model: ModelConfig, adapters: List[Adapter], explicit: Collection[str] = ()) -> ModelConfig:
    """The model to load under ``adapters``: the adapters' training run's model (its resolved.yaml), or
    the base their adapter_config.json names; else ``model`` (``model.*``). Keys in ``explicit``
    (:func:`npu_recipes.config.compose.command_line_keys`) take ``model``'s value in every case.

    Raises:
        UserError: the adapters were trained on different base models (names both).
    """
    if not adapters:
        return model
    chosen = {name: getattr(model, name) for name in _explicit_fields(explicit)}
    return dataclasses.replace(_recorded_base(model, adapters), **chosen)


def base_model_source(adapters: List[Adapter], explicit: Collection[str] = ()) -> str:
    """Where :func:`base_model_config` took the base model from, in words, for the log."""
    given = [f"model.{name}" for name in _explicit_fields(explicit)]
    if not adapters:
        return "model.* of this command"
    first = adapters[0]
    source = str(first.run_dir / RESOLVED) if first.run_dir else f"base_model_name_or_path in {first.path / ADAPTER_CONFIG}"
    return source + (f"; {', '.join(given)} from the command line" if given else "")


def _recorded_base(model: ModelConfig, adapters: List[Adapter]) -> ModelConfig:
    bases = {adapter.base_model_name_or_path for adapter in adapters}
    if len(bases) > 1:
        listed = "; ".join(f"{a.path} was trained on {a.base_model_name_or_path}" for a in adapters)
        raise UserError(f"adapters do not share one base model: {listed}", fix="serve or stack only adapters of the same base model")
    first = adapters[0]
    if first.run_dir is not None:
        resolved = first.run_dir / RESOLVED
        try:
            return load_resolved(resolved).model
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(
                f"adapters: {resolved}, which names the base model {first.path} was trained on, is unreadable "
                f"({type(error).__name__}: {first_line})",
                fix="restore the training run's resolved.yaml, or move the checkpoint out of that directory to load it "
                "on the base its adapter_config.json names",
            ) from None
    return dataclasses.replace(model, name_or_path=first.base_model_name_or_path, revision=None, builder=None)


_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight$")


def _lora_shapes(adapter: Adapter) -> List[tuple]:
    """``(module name, "A" or "B", shape)`` of every LoRA matrix in the adapter's safetensors file
    (read from its header; no tensor is loaded). Empty for the older ``adapter_model.bin``."""
    from safetensors import safe_open

    weights = adapter.path / ADAPTER_WEIGHTS[0]
    if not weights.is_file():
        return []
    shapes = []
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            match = _LORA_KEY.match(key)
            if match:
                shapes.append((match["module"], match["matrix"], tuple(handle.get_slice(key).get_shape())))
    return shapes


def _misfit(shapes: List[tuple], layers: dict) -> Optional[str]:
    for module_name, matrix, shape in shapes:
        layer = layers.get(module_name)
        if layer is None:
            return f"it adapts layer {module_name}, which that model does not have"
        if not hasattr(layer, "in_features"):
            continue
        # PEFT's LoRA on nn.Linear(in, out): lora_A.weight is (r, in), lora_B.weight is (out, r).
        fitted = shape[1] == layer.in_features if matrix == "A" else shape[0] == layer.out_features
        if not fitted:
            made_for = f"{shape[1]} inputs" if matrix == "A" else f"{shape[0]} outputs"
            return (f"its lora_{matrix} of layer {module_name} is made for {made_for}, but that layer of the model has "
                    f"{layer.in_features} inputs and {layer.out_features} outputs")
    return None


def check_adapters_fit(adapters: List[Adapter], base: ModelConfig, path: str) -> None:
    """Check, before any weight is loaded, that every adapter's LoRA matrices fit the model at ``path``.

    The model is built from its config.json on the meta device (no memory, no weights), and each
    adapter's matrix shapes are read from its safetensors header; a LoRA made for another model
    (another size or architecture) would otherwise fail inside PEFT after the whole base has loaded.

    Raises:
        UserError: an adapter does not fit; names the model it was trained on (its adapter_config.json),
            the model it is loaded on and where that came from, and the first layer that differs.
    """
    if not adapters:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(path, trust_remote_code=base.trust_remote_code, revision=base.revision)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=base.trust_remote_code)
    layers = dict(skeleton.named_modules())
    for adapter in adapters:
        problem = _misfit(_lora_shapes(adapter), layers)
        if problem is None:
            continue
        trained_on = adapter.base_model_name_or_path
        source = adapter.run_dir / RESOLVED if adapter.run_dir else f"base_model_name_or_path in its {ADAPTER_CONFIG}"
        if trained_on == path:
            raise UserError(
                f"adapter {adapter.path} does not fit the model it is loaded on, {path} (from {source}): {problem}; "
                "the model at that path has changed since the adapter was trained on it",
                fix=f"put the model the adapter was trained on back at {path}, or train a new adapter on the model there",
            )
        raise UserError(
            f"adapter {adapter.path} was trained on {trained_on} but is loaded on {path} (from {source}), "
            f"which it does not fit: {problem}",
            fix=f"apply the adapter to the model it was trained on ({trained_on}), or train a new adapter on {path}",
        )


