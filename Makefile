# Two commands: `make demo` (set up, then the main job on synthetic data) and `make test`.
# The virtual environment is made on first use and re-installed only when pyproject.toml changes.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

export TF_CPP_MIN_LOG_LEVEL ?= 2
export RAY_ENABLE_UV_RUN_RUNTIME_ENV ?= 0

.PHONY: install demo test test-slow test-all bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cxr demo --out $(DEMO_DIR) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m '' $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/input_pipeline.py
	$(BIN)/python bench/augment.py
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/sweep.py

clean:
	rm -rf $(VENV) runs .pytest_cache
