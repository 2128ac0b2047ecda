# One virtual environment, created on first use and reinstalled when
# pyproject.toml changes. Everything else runs inside it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= params/default.yaml
RUN    ?= runs/demo
# One test process per core (pytest-xdist), each test file in one of them (its module fixtures built once)
PYTEST_ARGS ?= -n auto --dist loadfile --durations=25

.PHONY: venv demo test clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "wsss needs Python 3.11, found " + sys.version' 
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wsss run --config $(CONFIG) --run-dir $(RUN)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
