# Two commands from a fresh clone: `make repro` (the pipeline) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch; on a CUDA machine, install your own torch into $(VENV) first and it is kept.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# DVC stages call `python`; make sure it is the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install repro test ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

repro: install
	$(BIN)/dvc repro

test: install
	$(BIN)/ruff check dalle pipelines tests notebooks
	$(BIN)/ruff format --check dalle pipelines tests notebooks
	$(BIN)/python -m pytest -q

# MLflow UI on the default store (loopback only); MLFLOW_TRACKING_URI users open their server instead.
ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .pytest_cache
