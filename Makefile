# npu_recipes front door. `make demo` and `make test` work on a fresh machine with Python 3.10+.
# `make install` (and `make demo`) install what running needs (the serve and deepspeed extras);
# `make test` adds the test tools (the test extra).
#
#   PY=/path/to/python   use an existing environment (e.g. one with torch_npu) instead of .venv
#   VENV=DIR             create (or use) the virtual environment in DIR instead of .venv
#   Later targets without VENV=/PY= use the interpreter the last install used (.install-stamp holds it).
#   TORCH_VERSION=X.Y.Z  torch to install when the environment has none (never replaces an existing torch)
#   ARGS="key=value ..." extra overrides for run targets; PYTEST_ARGS for `make test`
#
# Every recipe is a target: recipes/qwen7b_lora_zero3.yaml -> `make qwen7b-lora-zero3 ARGS="..."`.
# `make list` (npu-recipes ls) shows them with the seed's and the planned memory; `make docs` regenerates
# docs/recipes.md and the rows `ls` reads (npu_recipes/plan/catalogue.json).

PYTHON ?= python3
STAMP ?= .install-stamp
TEST_STAMP ?= .install-test-stamp
# The interpreter the last `make install` used (VENV=/PY= given then): later targets that name
# neither use it, rather than a .venv that may not exist.
INSTALLED_PY := $(strip $(shell cat "$(STAMP)" 2>/dev/null))
ifeq ($(origin PY)$(origin VENV),undefinedundefined)
ifneq ($(INSTALLED_PY),)
ifeq ($(wildcard $(INSTALLED_PY)),)
ifneq ($(filter-out clean,$(or $(MAKECMDGOALS),demo)),)
$(error $(STAMP) says npu_recipes was installed with $(INSTALLED_PY), which no longer exists: pass VENV=DIR or PY=PYTHON (the same as at install), or run make clean to install into .venv again)
endif
endif
PY := $(INSTALLED_PY)
endif
endif
VENV ?= .venv
PY ?= $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
ARGS ?=
PYTEST_ARGS ?= -n 2 --dist loadfile
FAST_PYTEST_ARGS ?= -n 2 -m "not slow and not cli" -p no:cacheprovider
RECIPE_TARGETS := $(subst _,-,$(filter-out demo,$(basename $(notdir $(wildcard recipes/*.yaml)))))

.PHONY: install demo test test-fast lint clean list docs other-interpreter $(RECIPE_TARGETS)

# VENV=/PY= naming another interpreter than the stamp's installs into that one too.
$(STAMP): setup.cfg pyproject.toml $(if $(INSTALLED_PY),$(if $(filter-out $(INSTALLED_PY),$(PY)),other-interpreter))
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "npu_recipes needs Python 3.10 or newer")'
	@test -x "$(PY)" || $(PYTHON) -m venv $(VENV)
	@"$(PY)" -c 'import torch' 2>/dev/null && echo "keeping installed torch: $$("$(PY)" -c 'import torch; print(torch.__version__)')" \
		|| "$(PY)" -m pip install "torch==$(TORCH_VERSION)"
	"$(PY)" -m pip install -e ".[serve,deepspeed]"
	@echo "$(PY)" > $(STAMP)

# The test tools (pytest, ruff, import-linter, hypothesis, the openai client) on top of what running needs.
$(TEST_STAMP): $(STAMP)
	"$(PY)" -m pip install -e ".[test]"
	@echo "$(PY)" > $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	"$(PY)" -m npu_recipes +recipe=demo $(ARGS)

test: lint
	"$(PY)" -m pytest $(PYTEST_ARGS)

# The in-process tier (pure logic, nothing started): under a minute on 2 idle cores.
test-fast: $(TEST_STAMP)
	HYPOTHESIS_PROFILE=fast "$(PY)" -m pytest $(FAST_PYTEST_ARGS)

# The package's import layers (.importlinter) and ruff's rules (pyproject.toml).
lint: $(TEST_STAMP)
	"$(PY)" -m ruff check npu_recipes tests bench
	"$(PY)" -c 'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())' 

$(RECIPE_TARGETS): $(STAMP)
	"$(PY)" -m npu_recipes +recipe=$(subst -,_,$@) $(ARGS)

list: $(STAMP)
	"$(PY)" -m npu_recipes ls

docs: $(STAMP)
	"$(PY)" -m npu_recipes.plan.recipes_page

clean:
	rm -rf $(STAMP) $(TEST_STAMP) build dist *.egg-info outputs multirun .pytest_cache
