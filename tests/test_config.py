"""Composition and validation: every recipe and group option, and the messages for bad overrides."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npu_recipes.config import compose, resolved, schema
from npu_recipes.errors import UserError

# Options that need a user-supplied path before they validate.
PATH_OVERRIDES = {
    ("model", "local"): ["model.name_or_path=/models/my-checkpoint"],
    ("dataset", "local"): ["dataset.path=/data/train.jsonl"],
}


@pytest.mark.parametrize("recipe", compose.recipe_names())
def test_every_recipe_composes_and_validates(recipe):
    config = compose.compose([f"+recipe={recipe}"])
    assert config.recipe == recipe
    assert config.stage == "train"
    assert config.model.name_or_path and config.dataset.path
    assert config.output_dir.startswith(f"outputs/{recipe}/")


def _group_options():
    return [(group, option) for group, options in compose.group_options().items() if group != "recipe" for option in options]


@pytest.mark.parametrize("group,option", _group_options())
def test_every_group_option_composes_and_validates(group, option):
    config = compose.compose([f"{group}={option}", *PATH_OVERRIDES.get((group, option), [])])
    if group in ("device", "train_type", "stage"):
        assert getattr(config, group) == option
    elif group == "parallelism":
        assert config.parallelism.name == option


@pytest.mark.parametrize("group,option", sorted(PATH_OVERRIDES))
def test_options_without_a_path_name_the_missing_key(group, option):
    with pytest.raises(UserError, match=rf"{group}\.(name_or_path|path) has no value"):
        compose.compose([f"{group}={option}"])


def test_seed_single_card_command_is_a_recipe_plus_overrides():
    """swift sft --model Qwen/Qwen2-7B-Instruct --dataset AI-ModelScope/blossom-math-v2 --num_train_epochs 5
    --train_type lora --learning_rate 1e-4 --gradient_accumulation_steps 16 --save_steps 100 --eval_steps 100"""
    config = compose.compose(["+recipe=qwen7b_lora_single"])
    assert (config.model.name_or_path, config.model.hub) == ("Qwen/Qwen2-7B-Instruct", "modelscope")
    assert (config.dataset.path, config.dataset.hub) == ("AI-ModelScope/blossom-math-v2", "modelscope")
    assert config.train.num_train_epochs == 5 and config.train_type == "lora"
    assert config.train.learning_rate == 1e-4
    assert config.train.save_steps == 100 and config.train.eval_steps == 100
    assert config.dataset.val_split_ratio == 0.01
    # Packed (docs/packing.md): one ~2048-token pack (about 11 samples) per optimizer step instead of 16
    # single samples; the seed's exact run is two overrides away.
    assert config.train.packing and config.train.gradient_accumulation_steps == 1
    exact = compose.compose(["+recipe=qwen7b_lora_single", "train.packing=false", "train.gradient_accumulation_steps=16"])
    assert not exact.train.packing and exact.train.gradient_accumulation_steps == 16
    overridden = compose.compose(["+recipe=qwen7b_lora_single", "train.learning_rate=2e-4", "train_type=full"])
    assert overridden.train.learning_rate == 2e-4 and overridden.train_type == "full"


def test_defaults_equal_swift_sft():
    config = compose.compose(["model=qwen2_7b_instruct"])
    train, lora = config.train, config.lora
    assert (train.per_device_train_batch_size, train.gradient_accumulation_steps) == (1, 16)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (8, 32, 0.05, "all-linear")
    assert train.gradient_checkpointing and train.lr_scheduler_type == "cosine" and train.warmup_steps == 0
    assert (train.weight_decay, train.adam_beta2, train.seed) == (0.1, 0.95, 42)
    assert (train.save_steps, train.eval_steps, train.max_length, train.truncation_strategy) == (100, 100, 2048, "drop")
    assert train.learning_rate == 1e-4
    assert compose.compose(["train_type=full"]).train.learning_rate == 1e-5
    assert config.model.trust_remote_code is False


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.learnin_rate=1e-4", "did you mean 'train.learning_rate'"),
        ("lora.rank=4", "unknown config key 'lora.rank'"),
        ("modle=tiny_qwen2", "did you mean 'model'"),
        ("model=qwen2_7b_instrct", "did you mean 'qwen2_7b_instruct'"),
        ("+recipe=qwen7b_lora_singel", "did you mean 'qwen7b_lora_single'"),
        ("recipe=demo", "+recipe=demo"),
        ("model.torch_dtype=bf16", "did you mean 'bfloat16'"),
        ("train.truncation_strategy=cut", "choose one of: drop, truncate"),
        ("train.gradient_accumulation_steps=0", "must be > 0"),
        ("dataset.val_split_ratio=1.5", "must be in [0, 1)"),
        ("train.learning_rate=nan", "is not a finite number"),
        ("train.learning_rate=inf", "is not a finite number"),
        ("dataset.val_split_ratio=0.99", "holds out 99% of the rows for validation and trains on the other 1%"),
        ("train.learning_rate=abc", "train.learning_rate=abc: Value 'abc' of type 'str' could not be converted to Float"),
        ("model.name_or_path=null", "model.name_or_path=null"),
        ("train.max_steps=0", "neither a step count nor -1"),
        ("train.lr_scheduler_type=cosin", "did you mean 'cosine'"),
        ("train.optim=adamw", "train.optim='adamw' is not valid"),
        ("train.adam_beta2=2", "must be in [0, 1)"),
        ("lora.bias=bogus", "choose one of: none, all, lora_only"),
        ("model.attn_implementation=flash", "model.attn_implementation='flash' is not valid"),
        (("train.lr_scheduler_type=greedy", "dataset.val_split_ratio=0"),
         "changes the learning rate on evaluation results, but dataset.val_split_ratio=0.0"),
        ('dataset.user_template="{question"', "not a valid str.format template"),
        ("nan_guard.inject_nan_at_steps=[0,-1,3]", "holds [0, -1]: optimizer steps are numbered from 1"),
    ],
)
def test_bad_overrides_name_the_key_and_the_closest_match(override, expected):
    with pytest.raises(UserError) as caught:
        compose.compose(list(override) if isinstance(override, tuple) else [override])
    assert expected in str(caught.value)


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(UserError) as caught:
        compose.compose(["+recipe=nope"])
    for name in compose.recipe_names():
        assert name in str(caught.value)


def test_resolved_yaml_round_trips(tmp_path):
    config = compose.compose(["+recipe=demo", "train.learning_rate=3e-4", "lora.target_modules=[q_proj,v_proj]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(resolved.to_yaml(config))
    assert resolved.load_resolved(path) == config


def _schema_keys(node=schema.RecipeConfig, prefix=""):
    """Every dotted key of the schema's dataclasses (``train.learning_rate``, ``adapters``, ...)."""
    keys = []
    for field in dataclasses.fields(node):
        annotation = compose._unwrap_optional(field.type)
        if dataclasses.is_dataclass(annotation):
            keys += _schema_keys(annotation, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


def _hydra_value(value) -> str:
    """``value`` written in Hydra's override grammar (strings quoted, so any text is one value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_hydra_value(item)}" for key, item in value.items()) + "}"
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_SCHEMA_KEYS = _schema_keys()
_GROUPS = compose.group_options()
_CHOICE_WORDS = sorted({word for choices in schema.CHOICES.values() for word in choices} | set(sum(_GROUPS.values(), [])))
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 0.5, 1.0, 1e-5, 2.0, 1e308]),
    st.sampled_from(_CHOICE_WORDS), st.text(max_size=12),
    st.sampled_from(["", " ", "{question}", "{}", "{a.b}", "${x}", "\\${x}", "${oc.env:HOME}", "${now:%Y}", "${train.seed}", "5GB", "x,y"]),
)
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3), st.dictionaries(st.sampled_from(["a", "b", "seed_row"]), _SCALARS, max_size=2))


def _override(prefix: str, key: str, value: str) -> str:
    return f"{prefix}{key}={value}"


_KEY_OVERRIDES = st.builds(
    _override,
    st.sampled_from(["", "", "", "+", "++", "~"]),
    st.one_of(st.sampled_from(_SCHEMA_KEYS), st.sampled_from(["train.learnin_rate", "foo", "model.x.y", "reference.a", "hydra.job.chdir"])),
    st.one_of(_VALUES.map(_hydra_value), st.text(max_size=10), st.sampled_from(["1,2", "a,b", "range(1,3)"])),
)
_GROUP_OVERRIDES = st.builds(
    _override,
    st.sampled_from(["", "", "+", "++", "~"]),
    st.sampled_from(sorted(_GROUPS)),
    st.one_of(st.sampled_from(_CHOICE_WORDS), st.text(max_size=8), st.sampled_from(["tiny_qwen2,local", "null"])),
)


def _valid_values(key: str, default):
    """Values of ``key`` that pass its own checks: its choices, or the default and one change of it
    that keeps its sign and range (half a positive float, twice a positive int, the other bool)."""
    if key in schema.CHOICES:
        return st.sampled_from(schema.CHOICES[key])
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int) and default > 0:
        return st.sampled_from([default, 2 * default])
    if isinstance(default, float) and default > 0:
        return st.sampled_from([default, default / 2])
    return st.just(default)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {key: value for name, item in tree.items() for key, value in _flat(item, f"{prefix}{name}.").items()}
    return {prefix[:-1]: tree}


_DEFAULTS = {key: value for key, value in _flat(dataclasses.asdict(compose.compose([]))).items()
             if key in _SCHEMA_KEYS and not isinstance(value, (dict, list)) and key not in ("output_dir", "recipe")}
_VALID_OVERRIDES = st.one_of(
    st.sampled_from(sorted(_DEFAULTS)).flatmap(lambda key: _valid_values(key, _DEFAULTS[key]).map(
        lambda value: _override("", key, _hydra_value(value)))),
    st.sampled_from([f"{group}={option}" for group, option in _group_options() if (group, option) not in PATH_OVERRIDES]),
)
"""Overrides that each pass on their own; a set of them still meets the cross-field rules."""


def _validates_or_refuses(overrides, directory) -> bool:
    """True when ``overrides`` validate (and resolved.yaml round-trips), False when refused with a UserError."""
    try:
        config = compose.compose(overrides)
    except UserError:
        return False
    path = directory / "resolved.yaml"
    path.write_text(resolved.to_yaml(config))
    assert resolved.load_resolved(path) == config
    return True


def _assert_both_outcomes_are_common(outcomes: list) -> None:
    """The generator must reach validation often (a test that passes when every set is refused tests
    nothing) and still produce refusals."""
    validated = sum(outcomes)
    assert len(outcomes) >= 20, "too few examples ran to judge the generator"
    assert 0.25 <= validated / len(outcomes) <= 0.9, f"{validated} of {len(outcomes)} generated override sets validated"


def test_any_override_set_validates_or_fails_with_a_user_error(tmp_path_factory):
    """Any composition of overrides over the schema's keys (values of every type, nan/inf and negative
    numbers, interpolations, unknown keys, +/++/~ prefixes, sweeps) and over the config groups and
    recipes (valid and invalid options) either validates, or raises UserError: never another
    exception from Hydra, OmegaConf or a check. A config that validates is written to resolved.yaml
    and read back equal, as the runner, workers and later stages do. Half the examples are built
    from overrides that each pass alone, so that many sets reach validation and some validate."""
    directory = tmp_path_factory.mktemp("resolved")
    outcomes = []

    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(st.lists(_VALID_OVERRIDES, max_size=5),
                     st.lists(st.one_of(_KEY_OVERRIDES, _GROUP_OVERRIDES, _VALID_OVERRIDES), max_size=5)))
    def validates_or_refuses(overrides):
        outcomes.append(_validates_or_refuses(overrides, directory))

    validates_or_refuses()
    _assert_both_outcomes_are_common(outcomes)


def test_plain_values_on_schema_keys_validate_or_fail_with_a_user_error(tmp_path_factory):
    """The same property where most compositions get as far as validation: a recipe or none, then
    plain ``key=value`` overrides of schema keys with values of every type, or values that pass alone."""
    directory = tmp_path_factory.mktemp("resolved")
    outcomes = []
    plain = st.builds(_override, st.just(""), st.sampled_from(_SCHEMA_KEYS), _VALUES.map(_hydra_value))

    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.one_of(st.just([]), st.sampled_from(compose.recipe_names()).map(lambda name: [f"+recipe={name}"])),
        st.lists(st.one_of(plain, _VALID_OVERRIDES, _VALID_OVERRIDES), max_size=3),
    )
    def validates_or_refuses(recipe, overrides):
        outcomes.append(_validates_or_refuses(recipe + overrides, directory))

    validates_or_refuses()
    _assert_both_outcomes_are_common(outcomes)


GOLDEN_RESOLVED = Path(__file__).parent / "golden" / "resolved_recipes"


@pytest.mark.parametrize("name", compose.recipe_names())
def test_every_recipe_resolves_as_before_the_shared_seed_block(monkeypatch, name):
    """The seed recipes share their training block (recipes/base/seed_sft.yaml) instead of repeating it;
    each still resolves to the config it did when every recipe spelled the block out.

    The golden files (tests/golden/resolved_recipes/NAME.yaml) were first written before that change;
    ``python -m tests.golden.regenerate_resolved`` rewrites them when a default deliberately changes
    (``git diff`` then shows exactly what each recipe now resolves to)."""
    monkeypatch.setenv("NPU_RECIPES_CACHE", "/cache")
    config = compose.compose([f"+recipe={name}", "output_dir=/runs/golden"])
    assert resolved.to_yaml(config) == (GOLDEN_RESOLVED / f"{name}.yaml").read_text()


def test_the_names_that_validate_without_transformers_are_transformers_own():
    """Validation answers without importing transformers for the usual scheduler and optimizer names;
    those lists must be transformers' own: every listed scheduler is built by ``get_scheduler`` from
    warmup and total steps alone, every other scheduler needs more, and every listed optimizer is
    one of its ``OptimizerNames``."""
    import torch
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    from npu_recipes.config import validate

    without_arguments = []
    for member in SchedulerType:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        try:
            get_scheduler(member.value, optimizer, num_warmup_steps=0, num_training_steps=10)
        except (ValueError, TypeError):
            continue
        without_arguments.append(member.value)
    assert sorted(validate.SCHEDULERS_WITHOUT_ARGUMENTS) == sorted(without_arguments)
    assert set(validate.COMMON_OPTIMIZERS) <= {member.value for member in OptimizerNames}


@pytest.mark.cli
def test_a_config_error_is_found_without_importing_torch_or_transformers():
    """What the CLI does before a stage runs (check the overrides, compose, validate) imports neither
    torch nor transformers, so a mistake is reported in about a second."""
    import subprocess
    import sys

    script = ("import sys\nfrom npu_recipes.config import compose\n"
              "compose.compose(['+recipe=qwen7b_lora_zero3', 'train.learning_rate=2e-4', 'train.optim=adamw_torch_fused'])\n"
              "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
