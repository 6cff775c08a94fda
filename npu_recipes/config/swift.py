"""ms-swift's command lines as npu_recipes overrides: ``npu-recipes sft|infer|export|deploy --flag value ...``.

The seed document (../shared/seed/NPU_SUPPORT.md) is written as ``swift`` commands. :func:`translate`
turns one such command, with ``swift`` replaced by ``npu-recipes``, into the Hydra overrides of the
equivalent ``python -m npu_recipes ...`` line; the CLI prints that line and runs it, so both spellings
compose exactly the same config. docs/swift.md is the table of every flag (:data:`FLAGS`) and what it
becomes; tests/test_swift.py holds the two together.

Flags take swift's spelling (``--learning_rate 1e-4`` or ``--learning_rate=1e-4``); list flags
(``--adapters A B``) take every value up to the next flag; booleans read ``true``/``false``. Model and
dataset ids that a shipped option names (``conf/model/*.yaml``, ``conf/dataset/*.yaml``) select that
option, so ``--model Qwen/Qwen2-7B-Instruct`` means ``model=qwen2_7b_instruct`` as the recipes do.
swift's launch variables (``NPROC_PER_NODE``, ``ASCEND_RT_VISIBLE_DEVICES``, ...) keep their meaning:
``NPROC_PER_NODE`` above 1 without ``--deepspeed`` is DDP, as in swift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

from npu_recipes import paths
from npu_recipes.config.schema import did_you_mean
from npu_recipes.errors import UserError

COMMANDS: Dict[str, str] = {
    "sft": "train",
    "infer": "infer",
    "export": "merge",
    "deploy": "serve",
}
"""swift's subcommands and the stage each one runs."""

SFT, INFER, EXPORT, DEPLOY = "sft", "infer", "export", "deploy"
_ALL = (SFT, INFER, EXPORT, DEPLOY)
_GENERATE = (INFER, DEPLOY)

ELLIPSIS = "..."
"""What the seed's multi-device blocks write for "the single-card command's other flags"."""
SEED_REMAINING_FLAGS = "--learning_rate 1e-4 --gradient_accumulation_steps 16 --save_steps 100 --eval_steps 100"

_PATH_PREFIXES = ("/", "./", "../", "~")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclass(frozen=True)
class Flag:
    """One swift flag: the subcommands that take it, what it becomes, and how many values it takes.

    ``key`` is the npu_recipes config key a plain value goes to (``train.learning_rate``); flags
    whose meaning needs more than one key are translated by a function in :data:`_SPECIAL` and
    leave ``key`` None. ``kind`` is ``value`` (one value), ``bool`` (true/false) or ``list`` (one or
    more values). ``means`` is the docs/swift.md cell describing the translation.
    """

    commands: Tuple[str, ...]
    key: Optional[str] = None
    kind: str = "value"
    means: str = ""


def _flag(key: str, *commands: str, kind: str = "value") -> Flag:
    return Flag(commands or (SFT,), key, kind, f"`{key}={'true|false' if kind == 'bool' else 'VALUE'}`")


FLAGS: Dict[str, Flag] = {
    # Model and data
    "model": Flag(_ALL, means="`model=OPTION` when a shipped option names the id; else `model=local model.name_or_path=ID` "
                  "(plus `model.hub=modelscope` for a hub id, swift's default hub)"),
    "use_hf": Flag(_ALL, kind="bool", means="`true`: hub ids of `--model`/`--dataset` are Hugging Face ids (`*.hub=huggingface`)"),
    "torch_dtype": _flag("model.torch_dtype", *_ALL),
    "attn_impl": Flag(_ALL, means="`model.attn_implementation=VALUE` (`flash_attn` is `flash_attention_2`)"),
    "dataset": Flag((SFT, INFER), kind="list", means="`dataset=OPTION` when a shipped option names the id; else "
                    "`dataset=local dataset.path=FILE_OR_ID` (OpenAI `messages` rows, or a file's question/answer-like column pair); "
                    "`ID#N` adds `dataset.max_samples=N`"),
    "split_dataset_ratio": _flag("dataset.val_split_ratio", SFT),
    "max_length": _flag("train.max_length", SFT),
    "truncation_strategy": Flag((SFT,), means="`delete`: `train.truncation_strategy=drop`; `right`: `truncate`"),
    "packing": _flag("train.packing", SFT, kind="bool"),
    "seed": _flag("train.seed", *_ALL),
    # Training
    "train_type": Flag((SFT,), means="`train_type=lora` or `train_type=full`"),
    "num_train_epochs": _flag("train.num_train_epochs"),
    "max_steps": _flag("train.max_steps"),
    "learning_rate": _flag("train.learning_rate"),
    "per_device_train_batch_size": _flag("train.per_device_train_batch_size"),
    "per_device_eval_batch_size": _flag("train.per_device_eval_batch_size"),
    "gradient_accumulation_steps": _flag("train.gradient_accumulation_steps"),
    "lr_scheduler_type": _flag("train.lr_scheduler_type"),
    "warmup_ratio": _flag("train.warmup_steps"),
    "warmup_steps": _flag("train.warmup_steps"),
    "weight_decay": _flag("train.weight_decay"),
    "adam_beta1": _flag("train.adam_beta1"),
    "adam_beta2": _flag("train.adam_beta2"),
    "max_grad_norm": _flag("train.max_grad_norm"),
    "optim": _flag("train.optim"),
    "gradient_checkpointing": _flag("train.gradient_checkpointing", kind="bool"),
    "logging_steps": _flag("train.logging_steps"),
    "save_steps": _flag("train.save_steps"),
    "eval_steps": _flag("train.eval_steps"),
    "save_total_limit": _flag("train.save_total_limit"),
    "report_to": _flag("train.report_to"),
    "dataloader_num_workers": _flag("train.dataloader_num_workers"),
    "lora_rank": _flag("lora.r"),
    "lora_alpha": _flag("lora.lora_alpha"),
    "lora_dropout": _flag("lora.lora_dropout"),
    "target_modules": Flag((SFT,), kind="list", means="`lora.target_modules=[A,B]` (`all-linear` as one value)"),
    "deepspeed": Flag((SFT,), means="`parallelism=zero2`, `zero3` or `zero3_offload` (one process unless `NPROC_PER_NODE` says more)"),
    "ddp_timeout": _flag("parallelism.ddp_timeout"),
    "output_dir": Flag((SFT, EXPORT), means="sft: `output_dir=DIR/<time>` (a new run directory inside DIR, as swift adds "
                       "`v<N>-<time>`; with `--add_version false` exactly `DIR`); export: `merge.output_dir=DIR`"),
    "add_version": Flag((SFT,), kind="bool", means="`false`: `--output_dir` is the run directory itself"),
    "resume_from_checkpoint": _flag("resume"),
    # Inference, merging, serving
    "adapters": Flag((INFER, EXPORT, DEPLOY), kind="list", means="`adapters=PATH` (several: `adapters=[A,B]`)"),
    "load_data_args": Flag((INFER, DEPLOY), kind="bool", means="infer: `load_data_args=true` (the training run's validation "
                           "split); deploy: nothing to add (the server always reads the adapter's training run for its base model)"),
    "merge_lora": Flag((EXPORT,), kind="bool", means="`true`: `stage=merge` (required: export only merges LoRA adapters)"),
    "infer_backend": Flag(_GENERATE, means="`pt` only (plain PyTorch; NPUs do not run vLLM, as the seed says)"),
    "max_new_tokens": _flag("infer.max_new_tokens", *_GENERATE),
    "temperature": Flag(_GENERATE, means="`infer.temperature=VALUE` and, above 0, `infer.do_sample=true` (0: greedy)"),
    "top_p": _flag("infer.top_p", *_GENERATE),
    "top_k": _flag("infer.top_k", *_GENERATE),
    "repetition_penalty": _flag("infer.repetition_penalty", *_GENERATE),
    "system": _flag("infer.system", *_GENERATE),
    "max_batch_size": Flag(_GENERATE, means="infer: `infer.batch_size=N`; deploy: `serve.max_batch_size=N`"),
    "host": _flag("serve.host", DEPLOY),
    "port": _flag("serve.port", DEPLOY),
    "api_key": _flag("serve.api_key", DEPLOY),
    "served_model_name": _flag("serve.served_model_name", DEPLOY),
    "max_model_len": _flag("serve.max_model_len", DEPLOY),
}
"""Every swift flag ``npu-recipes sft|infer|export|deploy`` accepts (swift's names), by name without ``--``."""


class Translation(NamedTuple):
    """A swift command as npu_recipes overrides.

    Attributes:
        overrides: Hydra overrides of the equivalent ``python -m npu_recipes ...`` line, in order.
        notes: one line each for flags that needed interpretation (printed before the run).
    """

    overrides: List[str]
    notes: List[str]


_PLAIN = re.compile(r"[A-Za-z0-9_./:@+\-~]+")


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value that stays the same string: bare when it is a plain word
    (letters, digits and ``_./:@+-~``), else single-quoted with ``\\`` and ``'`` escaped (Hydra's
    quoted-string grammar)."""
    if _PLAIN.fullmatch(text) and text.lower() not in ("null", "true", "false", "nan", "inf", "-inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _options_by_path(group: str, key: str) -> Dict[str, str]:
    """``{name_or_path or path: option}`` of the shipped options of ``conf/<group>/`` (plain YAML, no Hydra)."""
    from omegaconf import OmegaConf

    found: Dict[str, str] = {}
    for path in sorted((paths.conf_dir() / group).glob("*.yaml")):
        value = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get(key)
        if isinstance(value, str) and "${" not in value:
            found.setdefault(value, path.stem)
    return found


def _boolean(flag: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise UserError(f"--{flag} {value}: not true or false", fix=f"write --{flag} true or --{flag} false")


def _looks_local(value: str) -> bool:
    return value.startswith(_PATH_PREFIXES) or Path(value).expanduser().exists()


def parse(command: str, argv: List[str]) -> Dict[str, List[str]]:
    """swift-style ``--flag value ...`` arguments of ``command`` as ``{flag: [values]}``.

    Raises:
        UserError: a flag swift's command does not have here (names the closest known one), a
            flag of another subcommand, a value without a flag, a flag without a value, the
            seed's ``...`` placeholder, or a flag given twice.
    """
    parsed: Dict[str, List[str]] = {}
    current: Optional[str] = None
    for argument in argv:
        if argument == ELLIPSIS:
            raise UserError(
                "'...' in the seed document stands for the single-card command's other flags, it is not a flag itself",
                fix=f"write them out: {SEED_REMAINING_FLAGS}",
            )
        if argument.startswith("--"):
            name, has_value, value = argument[2:].partition("=")
            name = name.replace("-", "_")
            _check_flag(command, name)
            if name in parsed:
                raise UserError(f"--{name} is given twice", fix=f"keep one --{name}")
            parsed[name] = [value] if has_value else []
            current = None if has_value and FLAGS[name].kind != "list" else name
            continue
        if current is None:
            hint = ("npu-recipes subcommands take swift-style flags (--key value), not key=value overrides"
                    if "=" in argument else f"{argument!r} follows no flag")
            raise UserError(
                f"npu-recipes {command}: {hint}",
                fix="write --flag value, or use python -m npu_recipes key=value ... for npu_recipes' own overrides",
            )
        parsed[current].append(argument)
        if FLAGS[current].kind != "list":
            current = None
    for name, values in parsed.items():
        if not values:
            raise UserError(f"--{name} has no value", fix=f"write --{name} VALUE")
    return parsed


def _check_flag(command: str, name: str) -> None:
    flag = FLAGS.get(name)
    if flag is None:
        raise UserError(
            f"npu-recipes {command}: unknown flag --{name}"
            f"{did_you_mean('--' + name, ['--' + n for n, f in FLAGS.items() if command in f.commands])}",
            fix="see docs/swift.md for the swift flags npu-recipes understands, or use python -m npu_recipes key=value "
            "for any npu_recipes setting",
        )
    if command not in flag.commands:
        raise UserError(
            f"--{name} is a flag of npu-recipes {' / '.join(flag.commands)}, not of npu-recipes {command}",
            fix=f"drop --{name}, or run npu-recipes {flag.commands[0]}",
        )


def _model(value: str, hub: str) -> List[str]:
    option = _options_by_path("model", "name_or_path").get(value)
    if option is not None and not _looks_local(value):
        return [f"model={option}"] + ([f"model.hub={hub}"] if hub == "huggingface" else [])
    overrides = ["model=local", f"model.name_or_path={hydra_value(value)}"]
    if not _looks_local(value) and hub == "modelscope":
        overrides.append("model.hub=modelscope")
    return overrides


def _dataset(values: List[str], hub: str) -> List[str]:
    if len(values) > 1:
        raise UserError(f"--dataset names {len(values)} datasets; npu_recipes trains on one per run",
                        fix="merge them into one file and pass --dataset FILE")
    value, _, count = values[0].partition("#")
    if count and not count.isdigit():
        raise UserError(f"--dataset {values[0]}: the part after '#' must be a row count", fix="write --dataset ID#N, e.g. ID#500")
    option = None if _looks_local(value) else _options_by_path("dataset", "path").get(value)
    if option is not None:
        overrides = [f"dataset={option}"] + ([f"dataset.hub={hub}"] if hub == "huggingface" else [])
    else:
        overrides = ["dataset=local", f"dataset.path={hydra_value(value)}"]
        if not _looks_local(value):
            overrides.append(f"dataset.hub={hub}")
    return overrides + ([f"dataset.max_samples={count}"] if count else [])


_DEEPSPEED = {"zero2": "zero2", "zero3": "zero3", "zero3_offload": "zero3_offload"}
_ATTENTION = {"flash_attn": "flash_attention_2", "flash_attention_2": "flash_attention_2", "sdpa": "sdpa", "eager": "eager"}
_TRUNCATION = {"delete": "drop", "right": "truncate"}


def _one_of(flag: str, value: str, table: Mapping[str, str], why: str = "") -> str:
    if value not in table:
        raise UserError(
            f"--{flag} {value} is not supported here{why}{did_you_mean(value, table)}; choose one of: {', '.join(table)}",
            fix=f"write --{flag} {next(iter(table))} (or another value above)",
        )
    return table[value]


def translate(command: str, argv: List[str], environ: Mapping[str, str]) -> Translation:
    """The overrides of ``npu-recipes COMMAND ARGV...`` under the environment ``environ``.

    Args:
        command: ``sft``, ``infer``, ``export`` or ``deploy``.
        argv: the swift-style flags and values after the subcommand.
        environ: the process environment (``NPROC_PER_NODE`` decides between one process and DDP).

    Raises:
        UserError: as :func:`parse`; a value npu_recipes cannot run (several datasets, a DeepSpeed
            JSON file, ``--infer_backend vllm``, export without ``--merge_lora true``, ...).
    """
    flags = parse(command, argv)
    overrides: List[str] = [] if command == SFT else [f"stage={COMMANDS[command]}"]
    notes: List[str] = []
    hub = "huggingface" if "use_hf" in flags and _boolean("use_hf", flags["use_hf"][0]) else "modelscope"
    special: Dict[str, Callable[[List[str]], List[str]]] = {
        "use_hf": lambda values: [],
        "model": lambda values: _model(values[0], hub),
        "dataset": lambda values: _dataset(values, hub),
        "attn_impl": lambda values: [f"model.attn_implementation={_one_of('attn_impl', values[0], _ATTENTION)}"],
        "truncation_strategy": lambda values: [f"train.truncation_strategy={_one_of('truncation_strategy', values[0], _TRUNCATION)}"],
        "train_type": lambda values: [f"train_type={_one_of('train_type', values[0], {'lora': 'lora', 'full': 'full'})}"],
        "target_modules": lambda values: [f"lora.target_modules={values[0] if values == ['all-linear'] else _list(values)}"],
        "deepspeed": lambda values: _deepspeed(values[0], environ),
        "output_dir": lambda values: _output_dir(command, values[0], flags),
        "add_version": lambda values: [],
        "adapters": lambda values: [f"adapters={hydra_value(values[0]) if len(values) == 1 else _list(values)}"],
        "load_data_args": lambda values: _load_data_args(command, values[0], notes),
        "merge_lora": lambda values: [],
        "infer_backend": lambda values: [] if _one_of("infer_backend", values[0], {"pt": "pt"},
                                                      " (NPUs do not run vLLM; npu_recipes generates with plain PyTorch)") else [],
        "temperature": lambda values: _temperature(values[0]),
        "max_batch_size": lambda values: [f"{'infer.batch_size' if command == INFER else 'serve.max_batch_size'}={values[0]}"],
    }
    if command == EXPORT and not (flags.get("merge_lora") and _boolean("merge_lora", flags["merge_lora"][0])):
        raise UserError("npu-recipes export merges LoRA adapters into their base model and does nothing else",
                        fix="add --merge_lora true (quantization and pushing to a hub are not supported)")
    if command == SFT and "deepspeed" not in flags:
        overrides += _processes(environ)
    for name, values in flags.items():
        flag = FLAGS[name]
        if name in special:
            overrides += special[name](values)
        elif flag.kind == "bool":
            overrides.append(f"{flag.key}={'true' if _boolean(name, values[0]) else 'false'}")
        else:
            overrides.append(f"{flag.key}={hydra_value(values[0])}")
    return Translation(overrides, notes)


def _list(values: List[str]) -> str:
    return "[" + ",".join(hydra_value(value) for value in values) + "]"


def _processes(environ: Mapping[str, str]) -> List[str]:
    count = environ.get("NPROC_PER_NODE", "").strip()
    if count.isdigit() and int(count) > 1:
        # swift launches torchrun with DDP whenever NPROC_PER_NODE asks for several processes.
        return ["parallelism=ddp"]
    return []


def _deepspeed(value: str, environ: Mapping[str, str]) -> List[str]:
    if value.endswith(".json"):
        raise UserError(
            f"--deepspeed {value}: npu_recipes generates the DeepSpeed config from its settings (deepspeed.json in the run directory)",
            fix="write --deepspeed zero2, zero3 or zero3_offload",
        )
    overrides = [f"parallelism={_one_of('deepspeed', value, _DEEPSPEED)}"]
    if not environ.get("NPROC_PER_NODE", "").strip():
        # swift runs DeepSpeed in one process unless NPROC_PER_NODE asks for more.
        overrides.append("parallelism.nproc_per_node=1")
    return overrides


def _output_dir(command: str, value: str, flags: Dict[str, List[str]]) -> List[str]:
    if command == EXPORT:
        return [f"merge.output_dir={hydra_value(value)}"]
    if "add_version" in flags and not _boolean("add_version", flags["add_version"][0]):
        return [f"output_dir={hydra_value(value)}"]
    directory = hydra_value(value.rstrip("/"))
    timestamp = "${now:%Y%m%d-%H%M%S}"
    # Hydra resolves an interpolation inside a plain or a quoted value alike.
    return [f"output_dir={directory}/{timestamp}" if directory == value.rstrip("/") else f"output_dir={directory[:-1]}/{timestamp}'"]


def _load_data_args(command: str, value: str, notes: List[str]) -> List[str]:
    if not _boolean("load_data_args", value):
        return []
    if command == DEPLOY:
        notes.append("--load_data_args: the server reads the adapter's training run for its base model and chat template anyway")
        return []
    return ["load_data_args=true"]


def _temperature(value: str) -> List[str]:
    try:
        sampling = float(value) > 0
    except ValueError:
        raise UserError(f"--temperature {value}: not a number", fix="write e.g. --temperature 0.7 (0: greedy)") from None
    return [f"infer.temperature={value}", "infer.do_sample=true"] if sampling else ["infer.do_sample=false"]


def hydra_hint(argument: str, following: Optional[str]) -> Optional[str]:
    """For a swift-style ``--flag`` typed on the Hydra entry point, the override it means there,
    e.g. ``--model X`` -> ``model.name_or_path=X``; None when ``argument`` is no swift flag."""
    name, has_value, value = argument[2:].partition("=")
    name = name.replace("-", "_")
    flag = FLAGS.get(name)
    if flag is None:
        return None
    value = value if has_value else (following if following is not None and not following.startswith("--") else "VALUE")
    if name == "model":
        return f"model.name_or_path={value}"
    if flag.key is not None:
        return f"{flag.key}={value}"
    return None


SECRET_KEYS = ("serve.api_key",)
"""Config keys whose values are secrets: never printed or recorded (:func:`mask_secrets`)."""
MASK = "***"


def mask_secrets(argv: List[str]) -> List[str]:
    """``argv`` (overrides or swift-style flags) with the value of every secret (:data:`SECRET_KEYS`,
    and the swift flags that set one) replaced by ``***``, for the command lines npu_recipes prints
    and records."""
    secret_flags = {name for name, flag in FLAGS.items() if flag.key in SECRET_KEYS}

    def is_secret_flag(key: str) -> bool:
        return key.startswith("--") and key[2:].replace("-", "_") in secret_flags

    masked: List[str] = []
    for argument in argv:
        key, equals, _ = argument.partition("=")
        if masked and is_secret_flag(masked[-1]) and not argument.startswith("--"):
            masked.append(MASK)
        elif equals and (key.lstrip("+") in SECRET_KEYS or is_secret_flag(key)):
            masked.append(f"{key}={MASK}")
        else:
            masked.append(argument)
    return masked


def usage(command: str) -> str:
    """``npu-recipes COMMAND --help``: the command's usage line and every flag it accepts (:data:`FLAGS`)."""
    lines = [f"usage: npu-recipes {command} --flag value ...   (swift {command}; runs stage={COMMANDS[command]})", "",
             "flags (docs/swift.md has the whole table):"]
    for name, flag in FLAGS.items():
        if command in flag.commands:
            values = " V..." if flag.kind == "list" else " true|false" if flag.kind == "bool" else " V"
            lines.append(f"  --{name + values:<28} {flag.means.replace('`', '')}")
    lines += ["", "any other npu_recipes setting: python -m npu_recipes key=value ... (npu-recipes --help)"]
    return "\n".join(lines)


def flags_table() -> str:
    """The Markdown table of :data:`FLAGS` that docs/swift.md carries (tests/test_swift.py checks it is there)."""
    lines = ["| flag | subcommands | becomes |", "|---|---|---|"]
    for name, flag in FLAGS.items():
        values = " V..." if flag.kind == "list" else " true\\|false" if flag.kind == "bool" else " V"
        lines.append(f"| `--{name}{values}` | {', '.join(flag.commands)} | {flag.means.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"
