# npu_recipes front door. `make demo` and `make test` work on a fresh machine with Python 3.10+.
#
#   PY=/path/to/python   use an existing environment (e.g. one with torch_npu) instead of .venv
#   TORCH_VERSION=X.Y.Z  torch to install when the environment has none (never replaces an existing torch)
#   ARGS="key=value ..." extra overrides for run targets; PYTEST_ARGS for `make test`

PYTHON ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
ARGS ?=
PYTEST_ARGS ?=
STAMP := .install-stamp

.PHONY: install demo test clean

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "npu_recipes needs Python 3.10 or newer")'
	@test -x "$(PY)" || $(PYTHON) -m venv $(VENV)
	@"$(PY)" -c 'import torch' 2>/dev/null && echo "keeping installed torch: $$("$(PY)" -c 'import torch; print(torch.__version__)')" \
		|| "$(PY)" -m pip install "torch==$(TORCH_VERSION)"
	"$(PY)" -m pip install -e ".[test]"
	@echo "$(PY)" > $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	"$(PY)" -m npu_recipes +recipe=demo $(ARGS)

test: $(STAMP)
	"$(PY)" -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(STAMP) build dist *.egg-info outputs multirun .pytest_cache
