# Two commands: `make demo` (set up, then the main job on synthetic data) and `make test`.
# The virtual environment is made on first use and re-installed only when pyproject.toml changes.
# The newest Python >= 3.11 on PATH (or PY=/path/to/python3.11 on the command line).
PY ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
NEED_PY := cxr-tune needs Python >= 3.11: install python3.11 (e.g. apt install python3.11-venv, brew install python@3.11) or run make PY=/path/to/python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=
# make test runs whole test files on this many pytest-xdist workers (module fixtures stay on one);
# the tests wait on processes starting (Ray, TensorFlow, servers) much of the time, so 2 workers
# keep 2 cores ~90% busy. TEST_WORKERS=0 runs them in this process, one after another.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile

export TF_CPP_MIN_LOG_LEVEL ?= 2
export RAY_ENABLE_UV_RUN_RUNTIME_ENV ?= 0

.PHONY: install lock demo test test-fast test-slow test-all lint bench clean

install: $(STAMP)

# constraints.txt: the exact versions every cluster node installs (Dockerfile, cluster.yaml); the
# venv takes the same ones. uv installs them: the same pinned set as pip, in ~30 s instead of ~2 min
# on 2 cores (it downloads and unpacks TensorFlow, Ray and JAX in parallel). --compile-bytecode as
# pip does: otherwise the first test processes all compile TensorFlow's and Ray's .pyc at once.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || { test -n "$(PY)" && $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; } \
		|| { echo "$(NEED_PY)" >&2; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q 'uv>=0.5'
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt -e '.[dev,mlflow]'
	touch $(STAMP)

# Re-resolve constraints.txt after a change to pyproject.toml's dependencies (needs the network):
# Linux x86_64, Python 3.11, like Ray's cluster image; extras gpu and aws included.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra gpu --extra aws --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --annotation-style line \
		--custom-compile-command 'make lock' -o constraints.txt

demo: $(STAMP)
	$(BIN)/cxr demo --out $(DEMO_DIR) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 $(XDIST) $(PYTEST_ARGS)

# No Ray, no subprocess (markers set in tests/conftest.py): the unit tests, in about a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m 'not slow and not ray and not subprocess' $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m slow $(XDIST) $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m '' $(XDIST) $(PYTEST_ARGS)

# ruff (lint and import order) and mypy, configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/input_pipeline.py
	$(BIN)/python bench/augment.py
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/cv.py
	$(BIN)/python bench/prepare_scale.py

clean:
	rm -rf $(VENV) runs .pytest_cache
