"""Merge stage: fold LoRA adapters into their base model with PEFT's ``merge_and_unload`` and save it.

``python -m npu_recipes stage=merge adapters=RUN/checkpoint-N`` writes ``RUN/checkpoint-N-merged/``
(or ``merge.output_dir``): sharded safetensors, config, generation config, tokenizer with its chat
template, and a ``manifest.json`` naming the base model, the adapters and the training run (which
``infer load_data_args=true`` follows back to the run's validation split).

The base model is the one the adapter's training run used (its resolved.yaml, see
:func:`npu_recipes.infer.adapters.base_model_config`), so a local or built base is never downloaded.
The directory is built under a temporary name and renamed when complete. The stage always runs in
one process on one device (or the CPU), whatever ``NPROC_PER_NODE`` or ``parallelism.*`` say.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import List, Optional, Tuple

from npu_recipes import atomic
from npu_recipes.config import compose
from npu_recipes.config.schema import MergeConfig, RecipeConfig
from npu_recipes.config.validate import shard_size
from npu_recipes.errors import UserError
from npu_recipes.infer import adapters, loading
from npu_recipes.model import pretrained
from npu_recipes.run import manifest
from npu_recipes.run.rundir import RunDir
from npu_recipes.runtime import devices
from npu_recipes.stages import Prepared

log = logging.getLogger(__name__)

MERGED_SUFFIX = "-merged"


def target_dir(merge: MergeConfig, parsed: List[adapters.Adapter]) -> Path:
    """Where the merged model goes: ``merge.output_dir``, else ``<checkpoint>-merged`` beside the adapter.

    Raises:
        UserError: several adapters and no ``merge.output_dir`` (there is no single checkpoint to name it after).
    """
    if merge.output_dir:
        return Path(merge.output_dir).expanduser().absolute()
    if len(parsed) > 1:
        raise UserError(f"merging {len(parsed)} adapters into one model needs a target directory", fix="pass merge.output_dir=DIR")
    return parsed[0].path.with_name(parsed[0].path.name + MERGED_SUFFIX)


def _checked_inputs(config: RecipeConfig) -> Tuple[List[adapters.Adapter], Path]:
    parsed = adapters.parse_adapters(config.adapters)
    if not parsed:
        raise UserError("stage=merge needs the LoRA checkpoint to merge", fix="pass adapters=RUN_DIR/checkpoint-N")
    target = target_dir(config.merge, parsed)
    if target.exists() and not config.merge.exist_ok:
        raise UserError(
            f"merge target {target} already exists",
            fix="pass merge.exist_ok=true to replace it, or merge.output_dir=DIR for another place",
        )
    try:
        atomic.check_writable(target.parent)
    except OSError as error:
        raise UserError(
            f"cannot write the merged model to {target}: {error.strerror}: {error.filename}",
            fix="pass merge.output_dir=DIR in a writable place",
        ) from None
    return parsed, target


def _weight_files(directory: Path) -> List[Path]:
    return sorted(directory.glob("*.safetensors"))


class MergeStage:
    in_launcher_only = True

    def prepare(self, config: RecipeConfig, fresh_output_dir: bool) -> Prepared:
        """Check the adapters and the target before anything loads; the merge writes no run directory.

        Raises:
            UserError: no adapters, bad adapter paths, adapters of different bases, an existing
                target without ``merge.exist_ok=true``, or a target directory that cannot be written.
        """
        parsed, _ = _checked_inputs(config)
        adapters.base_model_config(config.model, parsed, compose.command_line_keys())
        return Prepared(config, None)

    def run(self, config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
        """Merge ``config.adapters`` into their base and publish the merged model directory.

        Weights are saved in ``merge.torch_dtype`` (``auto``: the dtype the base checkpoint declares);
        the merge itself is PEFT's (``safe_merge=True`` checks the merged weights for NaN).

        Raises:
            UserError: as :meth:`prepare`; the target appeared while merging.
        """
        parsed, target = _checked_inputs(config)
        device = devices.resolve(config.device)
        explicit = compose.command_line_keys()
        base = adapters.base_model_config(config.model, parsed, explicit)
        base_path = pretrained.resolve_path(base)
        log.info("base model: %s (from %s)", base_path, adapters.base_model_source(parsed, explicit))
        if config.merge.torch_dtype == "auto":
            dtype = pretrained.checkpoint_dtype(base, base_path)
        else:
            dtype = pretrained.dtype_by_name(config.merge.torch_dtype)
        started = time.perf_counter()
        log.info("loading %s and %d adapter(s) on %s in %s to merge them", base_path, len(parsed), device.type, str(dtype))
        loaded = loading.load(base, parsed, device, dtype=dtype)
        merged = loaded.model.merge_and_unload(safe_merge=True, adapter_names=[a.name for a in parsed])
        training_run = parsed[0].run_dir
        log.info("merged %d adapter(s) with their base %s on %s in %s", len(parsed), base_path, device.type, str(dtype))

        def build(staging: Path) -> None:
            log.info("writing the merged model to %s (shards of at most %s)", target, config.merge.max_shard_size)
            merged.save_pretrained(staging, max_shard_size=shard_size(config.merge.max_shard_size))
            pretrained.load_tokenizer(base, base_path).save_pretrained(staging)
            weights = _weight_files(staging)
            manifest.write_merged(staging, manifest.MergedModelManifest(
                base_model=base_path,
                base_model_config=dataclasses.asdict(base),
                adapters=[manifest.AdapterRecord(a.name, str(a.path), a.base_model_name_or_path) for a in parsed],
                training_run=str(training_run) if training_run else None,
                method="peft merge_and_unload(safe_merge=True)",
                dtype=str(dtype).replace("torch.", ""),
                device=device.type,
                shards=[w.name for w in weights],
                weights_bytes=sum(w.stat().st_size for w in weights),
                command=manifest.command_line(),
                git_commit=manifest.git_commit(),
                versions=manifest.package_versions(),
                created_at=manifest.now(),
            ))

        if not atomic.publish_directory(build, target, replace=config.merge.exist_ok):
            raise UserError(
                f"merge target {target} appeared while this merge was running (another merge of the same checkpoint?)",
                fix="check that directory; pass merge.exist_ok=true to replace it",
            )
        weights = _weight_files(target)
        size = sum(w.stat().st_size for w in weights)
        print(
            f"\nmerged model: {target}\n"
            f"weights:      {len(weights)} safetensors file(s), {size / devices.GIB:.3f} GiB, {str(dtype).replace('torch.', '')}\n"
            f"took:         {time.perf_counter() - started:.1f} s",
            flush=True,
        )


STAGE = MergeStage()
