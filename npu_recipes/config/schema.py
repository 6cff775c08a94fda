"""Dataclass schemas for every config group, registered in Hydra's ConfigStore.

Hydra merges each group's YAML into these typed nodes, so a misspelt key inside a YAML file or a
value of the wrong type fails at composition time with the key's full name. Field names follow
transformers ``TrainingArguments`` (``train.*``), PEFT ``LoraConfig`` (``lora.*``) and
``from_pretrained`` (``model.*``) wherever such a name exists.

The dataclasses are frozen: once :func:`npu_recipes.config.validate.validate` has built a
:class:`RecipeConfig`, nothing changes it; a stage that resolves a path or decides a setting
returns a new value (``dataclasses.replace``) instead. Hydra composes into a writable copy of the
schema (:func:`structured`).

Cross-field rules that a type cannot express live in :mod:`npu_recipes.config.validate`.
"""

import dataclasses
import difflib
import string
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

STAGES = ("train", "doctor", "merge", "infer", "serve", "plan")
DEVICES = ("auto", "npu", "cuda", "cpu")
TRAIN_TYPES = ("lora", "full")
PARALLELISMS = ("single", "ddp", "zero2", "zero3", "zero3_offload")
OFFLOAD_DEVICES = ("none", "cpu")
MODEL_HUBS = ("huggingface", "modelscope")
DATASET_HUBS = ("local", "huggingface", "modelscope")
TORCH_DTYPES = ("auto", "bfloat16", "float16", "float32")
TRUNCATION_STRATEGIES = ("drop", "truncate")
LORA_BIASES = ("none", "all", "lora_only")
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
KERNELS = ("auto", "none", "npu", "liger")
DOCTOR_FORMATS = ("table", "json")
ANSWER_FORMATS = ("gsm8k", "blossom")
SERVE_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
SERVE_ENGINES = ("auto", "static", "continuous")
PLAN_FORMATS = ("text", "json")
PLAN_LAUNCHERS = ("none", "slurm", "kubernetes")
PLAN_TARGETS = (
    "auto", "ascend_910b1", "ascend_910b2", "ascend_910b3", "ascend_910b4",
    "a100_40gb", "a100_80gb", "h100_80gb", "h200", "cpu",
)
"""``plan.target`` choices: ``auto`` and every device type of :data:`npu_recipes.plan.targets.TARGETS`
(tests/test_plan.py holds the two together)."""


@dataclass(frozen=True)
class ModelConfig:
    """``model/`` group: which base model to load and how.

    ``builder`` names a local builder (see :mod:`npu_recipes.model.pretrained`) that creates the model at
    ``name_or_path`` on first use; hub models leave it unset. ``attn_implementation`` is transformers'
    name, or ``auto``: chosen per device and for packing by :mod:`npu_recipes.model.attention` (every
    value keeps packed samples apart). ``device_map`` is ``from_pretrained``'s:
    null lets the Trainer place the model on this process's device; ``auto`` spreads one model over
    every visible device (one process only: it cannot be combined with DDP or DeepSpeed).
    """

    name_or_path: str = MISSING
    hub: str = "huggingface"
    torch_dtype: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str = "auto"
    revision: Optional[str] = None
    builder: Optional[str] = None
    device_map: Optional[str] = None


@dataclass(frozen=True)
class DatasetConfig:
    """``dataset/`` group: where rows come from and how their columns become chat messages.

    A row becomes messages in one of two ways:

    * ``messages_column`` names a column holding OpenAI-style ``[{"role", "content"}, ...]`` lists;
    * otherwise ``user_template`` / ``assistant_template`` (and optionally ``system_template``) are
      Python ``str.format`` templates over the row's columns, e.g. ``"{output}\\n\\nAnswer: {answer}"``.

    ``dataset=none`` (``path: null``) selects no data: the infer stage then chats in the terminal.
    ``answer_format`` (``gsm8k`` or ``blossom``) tells the infer stage how to extract final answers.

    ``max_samples`` keeps only the first N rows of the split (``split`` also accepts HF datasets
    slice syntax, quoted for Hydra: ``'dataset.split="train[:200]"'``). ``val_split_ratio`` of the rows
    (at least one row when positive) is held out for evaluation with ``train.seed``.
    """

    name: str = MISSING
    path: Optional[str] = MISSING
    hub: str = "local"
    subset: Optional[str] = None
    split: str = "train"
    messages_column: Optional[str] = None
    system_template: Optional[str] = None
    user_template: Optional[str] = None
    assistant_template: Optional[str] = None
    val_split_ratio: float = 0.01
    max_samples: Optional[int] = None
    builder: Optional[str] = None
    num_rows: Optional[int] = None
    answer_format: Optional[str] = None

    def mapped_columns(self) -> List[str]:
        """The data columns this mapping reads: the messages column, or every ``{column}`` of the
        templates in system, user, assistant order, each once."""
        if self.messages_column is not None:
            return [self.messages_column]
        columns: List[str] = []
        for template in (self.system_template, self.user_template, self.assistant_template):
            columns.extend(column for column in template_columns(template) if column not in columns)
        return columns


@dataclass(frozen=True)
class TrainConfig:
    """``train.*``: transformers ``TrainingArguments`` names, defaults equal to ``swift sft``'s but ``optim``:
    ``adamw_torch_fused`` (transformers' own default since torch 2.8; the same AdamW in one kernel,
    which the NaN guard can tell to skip a step without reading a device value; ``adamw_torch``
    where the device has no fused kernel, see :mod:`npu_recipes.train.arguments`).

    ``warmup_steps`` is a step count, or a fraction of all steps when below 1 (transformers 5).
    ``max_length`` (tokens per sample) and ``truncation_strategy`` (``drop`` or ``truncate``
    samples longer than ``max_length``) control tokenization. ``packing`` concatenates training
    samples into packs of at most ``max_length`` tokens with per-sample position ids
    (:mod:`npu_recipes.data.packing`); a micro-batch is then ``per_device_train_batch_size`` packs.
    ``learning_rate`` is set by the ``train_type`` group (1e-4 LoRA, 1e-5 full) unless given.
    ``gradient_checkpointing`` is ``true``, ``false`` or ``auto``: off when the memory planner's
    estimate without it fits the device with a 15% margin, on otherwise (decided in each training
    process for the device it has, logged and recorded in the manifest; see docs/memory.md).
    ``save_only_model`` saves weights and trainer state but no optimizer, scheduler or RNG state
    (smaller checkpoints that resume only with ``resume_weights_only=true``).
    ``metric_for_best_model`` (``eval_loss``, the one metric the evaluation reports) and
    ``greater_is_better`` (None: false for a loss, as transformers decides) pick the best saved
    checkpoint, which ``save_total_limit`` spares and the manifest names; ``load_best_model_at_end``
    loads its weights when training ends (transformers' meaning).
    ``global_batch_size`` (samples per optimizer step over every process; optional, swift's and
    DeepSpeed's ``train_batch_size`` meaning) replaces ``gradient_accumulation_steps`` with
    ``global_batch_size / (per_device_train_batch_size x world size)`` at validation.
    """

    learning_rate: float = 1e-4
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    global_batch_size: Optional[int] = None
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch_fused"
    gradient_checkpointing: Any = "auto"
    logging_steps: int = 5
    save_steps: int = 100
    eval_steps: int = 100
    save_total_limit: Optional[int] = None
    seed: int = 42
    report_to: str = "none"
    dataloader_num_workers: int = 0
    max_length: int = 2048
    truncation_strategy: str = "drop"
    packing: bool = False
    save_only_model: bool = False
    metric_for_best_model: str = "eval_loss"
    greater_is_better: Optional[bool] = None
    load_best_model_at_end: bool = False


@dataclass(frozen=True)
class LoraConfig:
    """``lora.*``: PEFT ``LoraConfig`` names; defaults equal ``swift sft``'s (r 8, alpha 32, dropout 0.05).

    ``target_modules: all-linear`` adapts every linear layer except the output head (PEFT's rule).
    """

    r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: Any = "all-linear"
    bias: str = "none"


@dataclass(frozen=True)
class MergeConfig:
    """``merge.*``: where and how the merge stage writes a LoRA merged into its base model.

    ``output_dir`` defaults to ``<checkpoint>-merged`` beside the (first) adapter checkpoint.
    ``exist_ok`` allows replacing an existing target (built aside, swapped in when complete).
    ``max_shard_size`` is transformers ``save_pretrained``'s (``"5GB"``, ``"500MB"`` or bytes).
    ``torch_dtype`` is the dtype of the saved weights; ``auto`` keeps the dtype the base
    checkpoint's config.json declares (bf16 for Qwen2), so the merged model replaces the base 1:1.
    """

    output_dir: Optional[str] = None
    exist_ok: bool = False
    max_shard_size: str = "5GB"
    torch_dtype: str = "auto"


@dataclass(frozen=True)
class InferConfig:
    """``infer.*``: generation options (transformers ``GenerationConfig`` names) and batch settings.

    Options left ``None`` keep the model's ``generation_config.json`` value. ``do_sample: false``
    (the default, for reproducible evaluation) is greedy decoding. ``system`` is a system prompt:
    the chat's first turn, and in batch mode it replaces the dataset's system turn.
    ``batch_size`` prompts are generated together (left padding); ``max_samples`` evaluates only
    the first N prompts; ``result_dir`` overrides where ``<timestamp>.jsonl`` results are written
    (default: ``infer_result/`` beside the checkpoint, or under ``output_dir`` for a plain base model).
    ``seed`` seeds sampling (``train.seed`` when unset).
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    batch_size: int = 8
    system: Optional[str] = None
    max_samples: Optional[int] = None
    result_dir: Optional[str] = None
    seed: Optional[int] = None


@dataclass(frozen=True)
class ParallelismConfig:
    """``parallelism/`` group: how many processes on how many nodes, and how they share the model.

    ``nproc_per_node``, ``nnodes``, ``node_rank``, ``master_addr`` and ``master_port`` are torchrun's
    arguments (``master_port: null`` lets torchrun pick a free port on a single node).
    ``zero_stage`` is DeepSpeed's ``zero_optimization.stage`` (null: no DeepSpeed; several processes
    then run DDP). ``offload_optimizer_device`` and ``offload_param_device`` are DeepSpeed's
    ``offload_optimizer.device`` / ``offload_param.device`` (``none`` or ``cpu``; parameters only
    with stage 3). ``ddp_timeout`` (seconds, transformers' name) bounds every collective of the
    process group (HCCL, NCCL or gloo), e.g. ranks waiting at a barrier for a slow one.
    ``shutdown_timeout`` (seconds, torchrun's ``--shutdown-timeout``) is how long workers stopped
    by SIGTERM/SIGINT may take to save their checkpoint before torchrun kills them.
    ``stop_timeout`` (seconds) is how long the training step under way when SIGTERM/SIGINT arrives
    may take to end; a step that takes longer is abandoned and the run stops without saving it
    (see :mod:`npu_recipes.run.stopping`).
    ``join_timeout`` (seconds, torchrun's c10d rendezvous setting of that name) bounds how long a
    multi-node run waits for every node to arrive, and how long a node other than node 0 waits for
    node 0 to create the run directory.
    """

    name: str = "single"
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: Optional[int] = None
    zero_stage: Optional[int] = None
    offload_optimizer_device: str = "none"
    offload_param_device: str = "none"
    ddp_timeout: int = 1800
    shutdown_timeout: int = 300
    stop_timeout: int = 120
    join_timeout: int = 600

    @property
    def world_size(self) -> int:
        """Processes over all nodes: ``nproc_per_node * nnodes``."""
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class NanGuardConfig:
    """``nan_guard.*``: what a training run does when a step's loss or gradient norm is inf or NaN.

    Such a step's update is skipped and recorded in logging.jsonl; after
    ``max_consecutive_bad_steps`` bad steps in a row the run stops (see :mod:`npu_recipes.train.nan_guard`).
    ``inject_nan_at_steps`` (1-based optimizer steps) turns those steps' loss into NaN on purpose,
    to rehearse the guard on a given setup.
    """

    max_consecutive_bad_steps: int = 5
    inject_nan_at_steps: List[int] = field(default_factory=list)


@dataclass(frozen=True)
class MfuConfig:
    """``mfu.*``: the peak that model FLOPs utilisation divides by (see docs/mfu.md).

    ``peak_tflops`` (TFLOP/s of one device) overrides the chip table, e.g. with a measured matmul
    rate; without it, bf16/fp16 runs on a listed chip use the table and other runs log ``mfu: null``.
    """

    peak_tflops: Optional[float] = None


@dataclass(frozen=True)
class DoctorConfig:
    """``doctor.*``: options of ``stage=doctor``; ``format`` is ``table`` (readable) or ``json``.

    ``memory_used_warn`` (a fraction) warns when a card the run would use already has more than that
    share of its memory in use (0.1: 10%); the check fails when the planned peak no longer fits in
    what is free.
    """

    format: str = "table"
    memory_used_warn: float = 0.1


@dataclass(frozen=True)
class ServeConfig:
    """``serve.*``: the OpenAI-compatible HTTP server of ``stage=serve`` (see docs/serving.md).

    ``host``/``port`` are where uvicorn listens (port 0 picks a free port, printed at start-up).
    ``api_key`` (None: no authentication) is the bearer token every route but ``/health`` requires.
    ``served_model_name`` is the base model's id in ``/v1/models`` (default: the last component of
    its path or hub id); each adapter's id is its name. Up to ``max_batch_size`` queued requests
    with the same model and sampling settings share one ``generate`` call; an idle worker waits
    ``batch_wait_ms`` milliseconds for company before starting. A request without ``max_tokens``
    gets ``default_max_tokens``; one asking for more than ``max_tokens_limit`` is refused (400).
    ``max_model_len`` (tokens, prompt plus completion) defaults to the model's
    ``max_position_embeddings``. ``timeout_graceful_shutdown`` (seconds, None: wait for every
    in-flight request) and ``log_level`` are uvicorn's settings of the same names.
    ``max_request_bytes`` is the largest request body accepted (bytes; larger: 413).
    ``allow_base_mismatch`` lets adapters be served on a base model other than the one they were
    trained on. ``engine``: ``static`` (the server's batcher, one ``generate`` call per batch),
    ``continuous`` (transformers' continuous batching, where it supports the model and adapters),
    ``auto`` (the faster on the device, see docs/serving.md).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    served_model_name: Optional[str] = None
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    default_max_tokens: int = 512
    max_tokens_limit: int = 4096
    max_model_len: Optional[int] = None
    timeout_graceful_shutdown: Optional[int] = None
    log_level: str = "info"
    allow_base_mismatch: bool = False
    engine: str = "auto"
    max_request_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class PlanConfig:
    """``plan.*``: options of ``stage=plan`` (see docs/memory.md).

    ``target`` is the device type to plan for (``auto``: by ``device``, the seed's Ascend 910B3 for
    npu/auto, A100 80GB for cuda, host RAM for cpu); ``device_memory_gib`` overrides its memory (GiB).
    ``format: json`` prints one JSON object instead of text. ``launcher`` also writes a job file for
    a scheduler: ``slurm`` an sbatch script, ``kubernetes`` a Kubeflow PyTorchJob manifest (see
    docs/distributed.md), into ``launcher_file`` (default ``<recipe>.sbatch`` /
    ``<recipe>-pytorchjob.yaml`` in the current directory); ``image`` is the PyTorchJob's container image.
    """

    format: str = "text"
    target: str = "auto"
    device_memory_gib: Optional[float] = None
    launcher: str = "none"
    launcher_file: Optional[str] = None
    image: str = "npu-recipes:latest"


@dataclass(frozen=True)
class RecipeConfig:
    """The whole composed config: one object handed from the runner to every stage.

    ``recipe`` is the name of the chosen ``+recipe=NAME`` (``adhoc`` without one). ``output_dir`` is the run
    directory (``outputs/<recipe>/<timestamp>`` unless given). ``adapters`` (a checkpoint path, a
    list, or a name -> path mapping) and ``load_data_args`` are read by merge, infer and serve.
    ``merge``, ``infer`` and ``serve`` hold those stages' options.
    ``reference`` carries a recipe's metadata (the seed document's reported memory and runtime).
    ``kernels`` picks fused kernels: ``auto`` (``npu`` where a Qwen2-family model trains on an NPU,
    else none), ``none``, ``npu`` (torch_npu RMSNorm, rotary embedding and SwiGLU for Qwen2) or
    ``liger`` (Liger kernels on CUDA); see docs/kernels.md. They are applied in training only.
    ``plan`` holds the options of ``stage=plan``.
    ``resume`` (train stage): ``auto`` continues the run already in an explicit ``output_dir`` from
    its newest complete checkpoint, ``never`` refuses a non-empty ``output_dir``, and a checkpoint
    path starts a new run from that checkpoint (see :mod:`npu_recipes.run.resume`).
    ``resume_weights_only=true`` continues from a checkpoint's weights and trainer state alone, with
    a fresh optimizer (a checkpoint lacking optimizer, scheduler or RNG state is refused without it).
    """

    recipe: str = "adhoc"
    description: str = ""
    stage: str = "train"
    device: str = "auto"
    train_type: str = "lora"
    output_dir: str = "outputs/${recipe}/${now:%Y%m%d-%H%M%S}"
    adapters: Any = None
    load_data_args: bool = False
    resume: str = "auto"
    resume_weights_only: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    reference: Dict[str, Any] = field(default_factory=dict)
    kernels: str = "auto"
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    mfu: MfuConfig = field(default_factory=MfuConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


CHOICES: Dict[str, tuple] = {
    "stage": STAGES,
    "device": DEVICES,
    "train_type": TRAIN_TYPES,
    "parallelism.name": PARALLELISMS,
    "model.hub": MODEL_HUBS,
    "model.torch_dtype": TORCH_DTYPES,
    "dataset.hub": DATASET_HUBS,
    "train.truncation_strategy": TRUNCATION_STRATEGIES,
    "parallelism.offload_optimizer_device": OFFLOAD_DEVICES,
    "parallelism.offload_param_device": OFFLOAD_DEVICES,
    "lora.bias": LORA_BIASES,
    "model.attn_implementation": ATTN_IMPLEMENTATIONS,
    "kernels": KERNELS,
    "doctor.format": DOCTOR_FORMATS,
    "merge.torch_dtype": TORCH_DTYPES,
    "serve.log_level": SERVE_LOG_LEVELS,
    "serve.engine": SERVE_ENGINES,
    "plan.format": PLAN_FORMATS,
    "plan.target": PLAN_TARGETS,
    "plan.launcher": PLAN_LAUNCHERS,
}
"""Keys whose value must be one of a fixed set; checked by :func:`npu_recipes.config.validate`."""

SCHEMA_NAME = "npu_recipes_schema"


def template_columns(template: Optional[str]) -> List[str]:
    """The ``{column}`` names of a ``str.format`` template, in order (none for an empty template)."""
    if not template:
        return []
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest of ``candidates`` to ``word`` (difflib ratio >= 0.6), else ``""``."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _writable(node: DictConfig) -> DictConfig:
    """``node`` with the read-only flag OmegaConf sets for frozen dataclasses cleared on it and every
    nested section, so that Hydra can merge group options and overrides into it."""
    OmegaConf.set_readonly(node, None)
    for key in node:
        if dataclasses.is_dataclass(OmegaConf.get_type(node, key)):
            _writable(node[key])
    return node


def structured() -> DictConfig:
    """The :class:`RecipeConfig` schema with its defaults as a writable structured ``DictConfig``:
    values merge into it with type checks, and ``OmegaConf.to_object`` builds the frozen dataclasses from it."""
    return _writable(OmegaConf.structured(RecipeConfig))


def register() -> None:
    """Register :class:`RecipeConfig` (as :func:`structured`) as ``npu_recipes_schema`` for the primary config's defaults list."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=structured())
