# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, on its own, so pip takes the wheel you point it at (a local or CUDA build);
# override e.g. TORCH="torch torchvision" or TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,onnx

.PHONY: venv demo lint test test-slow bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

demo: venv
	$(BIN)/python -m unetseg demo

lint: venv
	$(BIN)/ruff check unetseg tests experiments scripts benchmarks docker
	$(BIN)/ruff format --check unetseg tests experiments scripts benchmarks docker

test: venv lint
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

bench: venv
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf runs demo_output .pytest_cache
