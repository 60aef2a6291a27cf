# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, on its own, so pip takes the wheel you point it at (a local or CUDA build);
# override e.g. TORCH="torch torchvision" or TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu".
# The default wheel from PyPI brings CUDA libraries (nvidia-* 3.2 GB, triton 0.9 GB of a 6.8 GB .venv) even
# to a CPU-only machine; the CPU index above is the small one (no GPU support). make does not pick it for you:
# that index is not reachable from every machine (not from this project's CI); a failed download stops the install.
TORCH ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,onnx

.PHONY: venv demo lint test test-slow bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "== creating $(VENV) and installing PyTorch ($(TORCH)): a few minutes, GBs with CUDA libraries"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	@echo "== installing unetseg and its dependencies"
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $@
	@echo "== installed. Commands: $(BIN)/unetseg-plan, -train, -predict, -evaluate, -export (or: source $(BIN)/activate)"

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
