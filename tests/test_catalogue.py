"""The recipe catalogue: one recipe per seed table row with the seed's settings, `make list`, make
targets generated from recipes/, and docs/recipes.md kept current."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from npu_recipes.config import compose
from npu_recipes.plan import recipes_page
from tests.helpers import REPO, SHARED

SEED = SHARED / "seed" / "NPU_SUPPORT.md"
MODEL_FOR_SIZE = {"7B": "Qwen/Qwen2-7B-Instruct", "14B": "Qwen/Qwen2.5-14B-Instruct"}


def seed_table() -> list[tuple[int, str, int, str, int]]:
    """(row, model size, devices, DeepSpeed type, GB per device) of the seed's memory table."""
    if not SEED.is_file():
        pytest.skip(f"seed document not found at {SEED}")
    rows = re.findall(r"^\| (\d+B)\s+\| (\d+)\s+\| (\w+)\s+\| \d+ \* (\d+) GB \|$", SEED.read_text(), flags=re.M)
    assert len(rows) == 9
    return [(i, size, int(n), ds, int(gb)) for i, (size, n, ds, gb) in enumerate(rows, 1)]


@functools.lru_cache(maxsize=None)
def _every_recipe() -> tuple:
    return tuple(compose.compose([f"+recipe={name}"]) for name in compose.recipe_names())


def recipe_for_row(row: int):
    matches = [c for c in _every_recipe() if c.reference.get("seed_row") == row]
    assert len(matches) == 1, f"seed table row {row} has {len(matches)} recipes"
    return matches[0]


def test_every_seed_table_row_is_one_recipe_with_the_seeds_settings():
    for row, size, devices, deepspeed, gb in seed_table():
        config = recipe_for_row(row)
        assert config.model.name_or_path == MODEL_FOR_SIZE[size] and config.model.hub == "modelscope"
        assert config.parallelism.nproc_per_node * config.parallelism.nnodes == devices == config.reference["devices"]
        expected = {"None": "single" if devices == 1 else "ddp", "zero2": "zero2", "zero3": "zero3"}[deepspeed]
        assert config.parallelism.name == expected
        assert config.reference["max_memory_gb_per_device"] == gb
        assert (config.dataset.path, config.dataset.hub, config.dataset.val_split_ratio) == ("AI-ModelScope/blossom-math-v2", "modelscope", 0.01)
        train = config.train
        # The seed accumulates 16 samples per step; a recipe that packs accumulates one pack of
        # max_length tokens (about 11 blossom-math-v2 samples) instead (docs/packing.md).
        assert (train.num_train_epochs, train.learning_rate, train.gradient_accumulation_steps) == (5, 1e-4, 1 if train.packing else 16)
        assert (train.save_steps, train.eval_steps, config.train_type) == (100, 100, "lora")
        assert config.recipe.startswith(f"qwen{size.lower()}_lora_")
    assert recipe_for_row(4).recipe == "qwen7b_lora_zero3"
    assert compose.compose(["+recipe=qwen14b_lora_zero3", "model=qwen1_5_14b_chat"]).model.name_or_path == "Qwen/Qwen1.5-14B-Chat"
    assert compose.compose(["+recipe=qwen7b_lora_zero3", "train_type=full"]).train_type == "full"


def _make(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    """Run make in the checkout with this interpreter and an up-to-date install stamp (nothing installs)."""
    stamp = tmp_path / "install-stamp"
    stamp.touch()
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), f"PY={sys.executable}", f"STAMP={stamp}", *arguments],
                          capture_output=True, text=True, timeout=900)


def _documented_rows() -> dict[str, list[str]]:
    table = [line.split("|")[1:-1] for line in recipes_page.page_path().read_text().splitlines() if line.startswith("| ") and "`" in line]
    return {cells[1].strip().strip("`"): [c.strip() for c in cells] for cells in table}


@pytest.mark.cli
def test_make_list_shows_every_recipe_with_the_seeds_and_the_planned_memory(tmp_path):
    """`make list` runs `npu-recipes ls`: a line per recipe as docs/recipes.md has it, its description below."""
    result = _make(tmp_path, "list")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: (line.split(), lines[number + 1].strip()) for number, line in enumerate(lines)
            if line.split() and line.split()[0] in compose.recipe_names()}
    documented = _documented_rows()
    assert set(documented) == set(rows) == set(compose.recipe_names())
    for name, cells in documented.items():
        row, description = rows[name]
        seed_gb, planned = cells[6], cells[8]
        assert row[1] == cells[3] and row[2] == cells[4] and row[3] == cells[5], f"{name}: {row} against {cells}"
        assert row[5] == seed_gb and planned in row, f"{name}: planned {planned} GiB not in {row}"
        assert description == compose.compose([f"+recipe={name}"]).description
    assert rows["qwen14b_lora_zero3"][0][1:6] == ["Qwen/Qwen2.5-14B-Instruct", "8", "zero3", "9", "31"]
    assert rows["demo"][0][-3:] == ["CPU", "(host", "RAM)"], "the demo is planned for this machine, not an Ascend card"


def test_make_install_and_demo_install_no_test_tools(tmp_path):
    """`make install`/`make demo` install the package with what running needs; `make test` adds the test extra."""
    fresh = [f"STAMP={tmp_path}/install-stamp", f"TEST_STAMP={tmp_path}/test-stamp", "PYTHON=python3", f"PY={tmp_path}/python"]
    demo = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), *fresh, "demo"], capture_output=True, text=True)
    assert '-m pip install -e ".[serve,deepspeed]"' in demo.stdout and "[test]" not in demo.stdout
    test = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), *fresh, "test"], capture_output=True, text=True)
    assert '-m pip install -e ".[test]"' in test.stdout and "-m pytest" in test.stdout


def test_later_targets_use_the_interpreter_the_install_stamp_names(tmp_path):
    """After `make install VENV=DIR` (or PY=), plain `make list`/`demo`/recipe targets run DIR's python,
    which the stamp names; a stamp naming an interpreter that is gone stops make with one line."""
    stamp = tmp_path / "install-stamp"
    stamp.write_text(f"{sys.executable}\n")
    (tmp_path / "test-stamp").touch()
    make = ["make", "-n", "--no-print-directory", "-C", str(REPO), f"STAMP={stamp}", f"TEST_STAMP={tmp_path}/test-stamp"]
    dry = subprocess.run([*make, "list", "demo", "qwen7b-lora-zero3"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [f'"{sys.executable}" -m npu_recipes {arguments}'.rstrip() + suffix for arguments, suffix in
                                       (("ls", ""), ("+recipe=demo", " "), ("+recipe=qwen7b_lora_zero3", " "))]
    other = subprocess.run([*make, f"PY={tmp_path}/python", "list"], capture_output=True, text=True)
    assert f'"{tmp_path}/python" -m pip install -e ".[serve,deepspeed]"' in other.stdout, "another interpreter is installed into first"
    stamp.write_text(f"{tmp_path}/gone/bin/python\n")
    gone = subprocess.run([*make, "list"], capture_output=True, text=True)
    assert gone.returncode != 0 and gone.stdout == ""
    assert f"installed with {tmp_path}/gone/bin/python, which no longer exists: pass VENV=DIR or PY=PYTHON" in gone.stderr
    assert subprocess.run([*make, "clean"], capture_output=True, text=True).returncode == 0


@pytest.mark.cli
def test_recipe_targets_are_generated_from_recipes_and_pass_args(tmp_path):
    model = tmp_path / "qwen2-7b"
    model.mkdir()
    (model / "config.json").write_bytes((REPO / "npu_recipes/model/configs/Qwen--Qwen2-7B-Instruct/config.json").read_bytes())
    dry = _make(tmp_path, "-n", *[name.replace("_", "-") for name in compose.recipe_names() if name != "demo"])
    assert dry.returncode == 0, dry.stderr
    for name in compose.recipe_names():
        if name != "demo":
            assert re.search(rf"-m npu_recipes \+recipe={name}\s*$", dry.stdout, flags=re.M), dry.stdout
    result = _make(tmp_path, "qwen7b-lora-zero3", f"ARGS=stage=plan plan.format=json model.name_or_path={model} train.learning_rate=2e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["settings"]["recipe"] == "qwen7b_lora_zero3" and report["settings"]["learning_rate"] == 2e-4
    assert report["settings"]["parallelism"] == "zero3" and report["settings"]["world_size"] == 4


@pytest.mark.slow
def test_docs_recipes_md_and_the_stored_rows_are_generated_from_the_current_recipes():
    """Fails when a recipe, the estimator or the generator changed without `make docs` (python -m
    npu_recipes.plan.recipes_page): docs/recipes.md, and the rows `npu-recipes ls` reads without planning."""
    from npu_recipes.plan import catalogue

    rows = catalogue.rows(cached=False)
    assert recipes_page.page_path().read_text() == recipes_page.render(rows), "docs/recipes.md is stale: run `make docs`"
    assert catalogue.CACHE.read_text() == catalogue.cache_text(rows), "npu_recipes/plan/catalogue.json is stale: run `make docs`"
    assert catalogue.rows() == rows
