# The commands the README gives. `make setup` is idempotent: it reinstalls only when
# pyproject.toml or constraints.txt changed since the last successful setup.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
PYTEST := $(BIN)/python -m pytest

.PHONY: setup test test-slow test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on this machine's disk (any other version pulls a CUDA build).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all,dev]'
	# onnx2tf (the tflite compiler's ONNX -> TensorFlow step) pins old onnx/numpy/protobuf: no deps.
	$(BIN)/python -m pip install -q --no-deps onnx2tf==1.29.24 onnx-graphsurgeon==0.6.1 sng4onnx==2.0.1 \
		sne4onnx==2.0.1 tf-keras==2.21.0
	touch $(STAMP)

test: setup
	$(PYTEST) -m "not slow" -q

test-slow: setup
	$(PYTEST) -m "slow" -q

test-all: setup
	$(PYTEST) -q

lint: setup
	$(BIN)/ruff check kernel plugins tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m benchmarks.kernel.run
	$(BIN)/python -m benchmarks.search.run
	$(BIN)/python -m benchmarks.compile.run
	$(BIN)/python -m benchmarks.serve.run
	$(BIN)/python -m benchmarks.frameworks.run

clean:
	rm -rf $(VENV) .mlk .pytest_cache .ruff_cache .mypy_cache
