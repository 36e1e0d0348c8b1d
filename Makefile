# make train / make test create .venv on first use. ARGS="loss=margin ..." passes Hydra overrides.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rmlab-installed
ARGS ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: train test lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# GPU machines: pip's default CUDA build. CPU machines: PyTorch's CPU index beside PyPI, where torch 2.13.0+cpu
	# outranks PyPI's CUDA build (no multi-GB download); where that index is unreachable, a local CPU wheel (pip's
	# find-links) or, failing both, PyPI's default build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install "torch>=2.4"; \
	else $(BIN)/pip install "torch==2.13.0" --extra-index-url $(TORCH_CPU_INDEX) || $(BIN)/pip install "torch==2.13.0"; fi
	$(BIN)/pip install -e ".[dev,all]"
	# RewardBench's own loading and scoring path, run by tests/test_clients.py and tests/test_benchmarks.py: its pins
	# (transformers 4, trl 0.x) clash with this stack, so it comes without its dependencies (fschat: its chat formats).
	$(BIN)/pip install --no-deps "rewardbench==0.1.4" "fschat==0.2.36"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check rmlab tests train.py eval.py

bench: $(STAMP)
	$(BIN)/python -m rmlab.bench $(ARGS)

clean-venv:
	rm -rf $(VENV)
