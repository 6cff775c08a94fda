"""``manifest.json``: what a run directory (or a merged model) holds, as typed records with one writer.

A training run's manifest is a :class:`RunManifest`; a merged model's is a :class:`MergedModelManifest`.
Every write goes through :func:`update` or :func:`write_merged` here: the fields are the
dataclasses' (a misspelt key is a ``TypeError``, not a new key), inf/NaN become null, and the file
is replaced atomically. The JSON keys are the field names, documented in the README's run-directory
table. Top-level keys a reader does not know (a manifest written by a newer version, or edited by
hand) are kept and written back unchanged; a record that is not what npu_recipes writes is refused
with one message naming its key, before anything in the run directory changes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

from npu_recipes import atomic
from npu_recipes.config import schedulers, swift, validate
from npu_recipes.errors import UserError

MANIFEST = "manifest.json"

RUNNING, COMPLETED, FAILED, INTERRUPTED = "running", "completed", "failed", "interrupted"
"""The values of :attr:`RunManifest.status`."""

_VERSIONED_PACKAGES = ("npu_recipes", "torch", "torch_npu", "transformers", "peft", "accelerate", "deepspeed", "datasets", "tokenizers")


def now() -> str:
    """The current local time, ISO 8601 with offset, to the second."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def package_versions() -> Dict[str, Optional[str]]:
    """Installed versions of the packages a run depends on (None when not installed)."""
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = None
    return versions


def git_commit() -> Optional[str]:
    """The commit of the git checkout npu_recipes runs from, or None outside a checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


LAUNCH_VARIABLES = (
    *schedulers.SWIFT.values(), "ASCEND_RT_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "HCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
    validate.SAME_HOST_NODES,
)
"""Environment variables that change what the same arguments launch (process count, node numbering, master,
visible devices, network interfaces): the recorded command sets those that were set."""


def command_line() -> str:
    """The command that started this process, as a user would retype it: the :data:`LAUNCH_VARIABLES`
    that are set, then ``python -m npu_recipes ...`` (e.g. ``NNODES=2 NODE_RANK=1 python -m npu_recipes ...``),
    secrets masked (``serve.api_key=***``)."""
    variables = [f"{name}={shlex.quote(os.environ[name])}" for name in LAUNCH_VARIABLES if name in os.environ]
    return " ".join([*variables, shlex.join([Path(sys.executable).name, "-m", "npu_recipes", *swift.mask_secrets(sys.argv[1:])])])


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None, so records stay strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


@dataclass(frozen=True)
class DeviceRecord:
    """The devices a run trains on: ``type`` (npu/cuda/cpu), visible ``count``, chip ``name``, weights'
    ``dtype``, ``world_size`` (processes in all), and the MFU peak (TFLOP/s per device) with its source;
    ``dtype_fallback`` says why ``dtype`` is not the checkpoint's (fp16 where bf16 is unsupported), else null."""

    type: str
    count: int
    name: str
    dtype: str
    world_size: int
    peak_tflops: Optional[float]
    peak_source: str
    dtype_fallback: Optional[str] = None


@dataclass(frozen=True)
class DatasetRecord:
    """The data a run trains on: its name, resolved path, HF datasets fingerprint and row counts
    (``rows`` loaded, ``held_out`` for validation before filtering, ``train`` and ``validation`` kept,
    dropped by reason, ``truncated``) and ``train_tokens``."""

    name: str
    path: Optional[str]
    fingerprint: str
    rows: int
    held_out: int
    train: int
    validation: int
    dropped_too_long: int
    dropped_no_assistant_tokens: int
    truncated: int
    train_tokens: int


@dataclass(frozen=True)
class PackingRecord:
    """Packing statistics (``train.packing=true``): samples, packs, tokens, ``fill`` (tokens over pack
    capacity) and the ``attention`` implementation packed rows run with."""

    samples: int
    packs: int
    tokens: int
    fill: float
    attention: str


@dataclass(frozen=True)
class AttentionRecord:
    """What ``model.attn_implementation`` became on this run's device (see :mod:`npu_recipes.model.attention`):
    the ``requested`` value, the implementation the model was ``loaded_as`` and the one it was
    ``trained_as``, how packed batches carry their sequence lengths (``cu_seq_lens``: ``device``,
    ``host_lists``, ``host_tensors`` or null) and ``why``."""

    requested: str
    loaded_as: str
    trained_as: str
    cu_seq_lens: Optional[str]
    why: str


@dataclass(frozen=True)
class CheckpointingRecord:
    """What ``train.gradient_checkpointing=auto`` decided (``setting`` is ``auto``), on the planner's
    numbers in GiB per device (see :class:`npu_recipes.plan.planner.CheckpointingDecision`)."""

    setting: str
    enabled: bool
    without_checkpointing_gib: float
    usable_gib: float
    margin: float


@dataclass(frozen=True)
class BatchRecord:
    """Samples per optimizer step: ``per_device_train_batch_size`` (micro-batch) x
    ``gradient_accumulation_steps`` x ``world_size`` = ``global_batch_size``; ``from_global_batch_size``
    is True when ``train.global_batch_size`` set the accumulation."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    global_batch_size: int
    from_global_batch_size: bool


@dataclass(frozen=True)
class LaunchRecord:
    """How the workers were started: ``world_size``, ``nproc_per_node``, ``nnodes`` and torchrun's ``command``."""

    world_size: int
    nproc_per_node: int
    nnodes: int
    command: str


@dataclass(frozen=True)
class ResumeRecord:
    """One rerun that continued the run: when, from which checkpoint (None: from step 0), its command,
    and whether it took the checkpoint's weights alone (``resume_weights_only=true``: fresh optimizer)."""

    at: str
    from_checkpoint: Optional[str]
    command: str
    weights_only: bool = False


@dataclass(frozen=True)
class FinalMetrics:
    """A completed run's figures: optimizer ``steps``, first and last training loss, last ``eval_loss``,
    ``train_runtime_s`` of the last launch (seconds), ``num_input_tokens_seen``, ``peak_memory_gib``
    (maximum over ranks), ``model_tflops`` per device, ``mfu``, ``skipped_steps`` (NaN guard) and
    the ``last_checkpoint``."""

    steps: int
    first_loss: Optional[float]
    last_loss: Optional[float]
    last_eval_loss: Optional[float]
    train_runtime_s: Optional[float]
    num_input_tokens_seen: Optional[int]
    peak_memory_gib: Optional[float]
    model_tflops: Optional[float]
    mfu: Optional[float]
    skipped_steps: int
    last_checkpoint: Optional[str]


@dataclass(frozen=True)
class BestCheckpointRecord:
    """The best saved checkpoint by ``metric`` (``train.metric_for_best_model``; higher is better when
    ``greater_is_better``): its ``checkpoint`` path, ``step`` and ``value``, spared by ``save_total_limit``
    and loaded by ``adapters=RUN/best``. ``best_evaluated_step``/``best_evaluated_value`` are the best
    evaluation of the whole run, which has no checkpoint when it fell between saves (evaluations more
    often than saves). ``loaded_at_end``: ``train.load_best_model_at_end`` loaded its weights when training ended."""

    metric: str
    greater_is_better: bool
    checkpoint: str
    step: int
    value: float
    best_evaluated_step: int
    best_evaluated_value: float
    loaded_at_end: bool = False


@dataclass(frozen=True)
class RunManifest:
    """A training run's ``manifest.json`` (see the README's run-directory table).

    ``status`` is :data:`RUNNING`, :data:`COMPLETED`, :data:`FAILED` or :data:`INTERRUPTED` (then
    ``stopped_at_step`` says where it stopped); ``last_checkpoint`` is the newest complete checkpoint of
    a completed or interrupted run; ``error`` is why it failed or stopped.
    ``resume_from`` is the checkpoint this launch continues (None: step 0), ``resume_weights_only``
    whether it took that checkpoint's weights alone (fresh optimizer moments, ``resume_weights_only=true``),
    ``branched_from`` the checkpoint a ``resume=PATH`` run started from, ``resumes`` every rerun.
    ``best_checkpoint`` names the best saved checkpoint (:class:`BestCheckpointRecord`), once one was evaluated. ``extra`` holds keys this
    version does not know (at the top level), written back as they were.
    """

    recipe: Optional[str] = None
    stage: Optional[str] = None
    status: Optional[str] = None
    command: Optional[str] = None
    cwd: Optional[str] = None
    git_commit: Optional[str] = None
    versions: Dict[str, Optional[str]] = field(default_factory=dict)
    host: Optional[str] = None
    pid: Optional[int] = None
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    error: Optional[str] = None
    device: Optional[DeviceRecord] = None
    dataset: Optional[DatasetRecord] = None
    packing: Optional[PackingRecord] = None
    attention: Optional[AttentionRecord] = None
    gradient_checkpointing: Optional[CheckpointingRecord] = None
    launch: Optional[LaunchRecord] = None
    batch: Optional[BatchRecord] = None
    resume_from: Optional[str] = None
    resume_weights_only: bool = False
    branched_from: Optional[str] = None
    resumes: List[ResumeRecord] = field(default_factory=list)
    stopped_at_step: Optional[int] = None
    last_checkpoint: Optional[str] = None
    best_checkpoint: Optional[BestCheckpointRecord] = None
    final_metrics: Optional[FinalMetrics] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterRecord:
    """One adapter folded into a merged model: its PEFT name, checkpoint path and the base it was trained on."""

    name: str
    path: str
    base_model_name_or_path: str


@dataclass(frozen=True)
class MergedModelManifest:
    """A merged model's ``manifest.json``, written by the merge stage.

    ``training_run`` names the run the (first) adapter came from, which ``infer load_data_args=true``
    follows back to the run's validation split.
    """

    base_model: str
    base_model_config: Dict[str, Any]
    adapters: List[AdapterRecord]
    training_run: Optional[str]
    method: str
    dtype: str
    device: str
    shards: List[str]
    weights_bytes: int
    command: str
    git_commit: Optional[str]
    versions: Dict[str, Optional[str]]
    created_at: str
    kind: str = "merged_model"
    stage: str = "merge"


class _NotARecord(ValueError):
    """A manifest value that is not what npu_recipes writes there (a hand edit, or another program's)."""


def _typed(annotation, value):
    """``value`` (parsed JSON) as ``annotation`` says: a dataclass record, a list of them, or as it is.

    Raises:
        _NotARecord: a record that is not an object, lacks one of its fields, or a list that is not a list.
    """
    if value is None:
        return None
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        annotation = next(argument for argument in arguments if argument is not type(None))
        origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise _NotARecord(f"a {type(value).__name__} where an object of {annotation.__name__} belongs")
        hints = typing.get_type_hints(annotation)
        fields = {f.name for f in dataclasses.fields(annotation) if f.default is dataclasses.MISSING
                  and f.default_factory is dataclasses.MISSING}
        missing = sorted(fields - set(value))
        if missing:
            raise _NotARecord(f"an object without {', '.join(missing)}")
        return annotation(**{key: _typed(hints[key], item) for key, item in value.items() if key in hints})
    if origin is list:
        if not isinstance(value, list):
            raise _NotARecord(f"a {type(value).__name__} where a list belongs")
        return [_typed(arguments[0], item) for item in value]
    return value


def _from_json(data: Dict[str, Any], path: Path) -> RunManifest:
    """The typed manifest of ``data``; a null value stands for the field's default (none, or empty).

    Raises:
        UserError: a record inside it is not what npu_recipes writes (names the key and the fix).
    """
    hints = typing.get_type_hints(RunManifest)
    defaults = RunManifest()
    fields = {}
    for key, value in data.items():
        if key not in hints or key == "extra":
            continue
        try:
            fields[key] = getattr(defaults, key) if value is None else _typed(hints[key], value)
        except _NotARecord as problem:
            raise UserError(
                f"{path}: its {key!r} is {problem}, not what npu_recipes writes there",
                fix=f"restore manifest.json, or delete its {key!r} key (npu_recipes writes it again), or pass a new output_dir",
            ) from None
    return RunManifest(**fields, extra={key: value for key, value in data.items() if key not in hints})


def _to_json(record) -> Dict[str, Any]:
    plain = dataclasses.asdict(record)
    extra = plain.pop("extra", {})
    return finite_or_null({**plain, **extra})


_RUN_MANIFEST_FIX = "restore it, or delete it (the next run in this directory writes a new one), or pass a new output_dir"


def _read_object(path: Path, fix: str = _RUN_MANIFEST_FIX) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        data = error
    if not isinstance(data, dict):
        reason = f" ({data})" if isinstance(data, Exception) else ""
        raise UserError(f"{path} is not a JSON object{reason}", fix=fix)
    return data


def read(directory: Path) -> RunManifest:
    """The manifest of the run in ``directory`` (an empty :class:`RunManifest` when there is none yet).

    Raises:
        UserError: manifest.json is not a JSON object (it is only ever written whole, so someone edited it).
    """
    path = Path(directory) / MANIFEST
    return _from_json(_read_object(path), path) if path.is_file() else RunManifest()


def update(directory: Path, **fields: Any) -> RunManifest:
    """Set ``fields`` (names of :class:`RunManifest`) in ``directory``'s manifest and rewrite it atomically.

    Raises:
        TypeError: a name that is not a field of :class:`RunManifest`.
        UserError: the manifest there is not a JSON object.
    """
    manifest = dataclasses.replace(read(directory), **fields)
    atomic.write_json(Path(directory) / MANIFEST, _to_json(manifest))
    return manifest


def write_merged(directory: Path, record: MergedModelManifest) -> None:
    """Write a merged model's manifest into ``directory`` (atomically)."""
    atomic.write_json(Path(directory) / MANIFEST, _to_json(record))


def training_run_of(model_dir: Path) -> Optional[str]:
    """The training run a merged model in ``model_dir`` came from (its manifest's ``training_run``), if any.

    Raises:
        UserError: its manifest.json is not a JSON object.
    """
    path = Path(model_dir) / MANIFEST
    merged_fix = "restore the merged model's manifest.json from its merge (stage=merge writes it), or merge again"
    recorded = _read_object(path, merged_fix).get("training_run") if path.is_file() else None
    if recorded is not None and not isinstance(recorded, str):
        raise UserError(
            f"{path}: its 'training_run' is a {type(recorded).__name__}, not the path of the training run the merge came from",
            fix="restore the merged model's manifest.json (or set training_run to that run's directory)",
        )
    return recorded
