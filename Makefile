# Two commands from a fresh clone: `make repro` (the pipeline) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch; on a CUDA machine, install your own torch into $(VENV) first and it is kept.
TORCH ?= torch==2.13.0
# Extras to install on top of the core, all at the versions in requirements.lock: dev (tests, ruff) by default;
# `make install EXTRAS=dev,notebooks,ui` adds JupyterLab and optuna-dashboard.
EXTRAS ?= dev
# The resolver behind `make lock` (pinned: it writes the lock's format).
UV ?= uv==0.13.9
LOCK := requirements.lock
BIN := $(VENV)/bin
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

# DVC stages call `python`; make sure it is the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install lock repro test ui clean

install: $(STAMP)

# torch first and outside the lock (the CPU wheel, or the user's CUDA build, kept: pinned to the installed build so
# pip fails rather than swap it); then the project, every other version decided by the lock (-c: only what the core
# and EXTRAS need gets installed).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(VENV)/torch.txt
	$(BIN)/python -m pip install --quiet -c $(LOCK) -c $(VENV)/torch.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Re-resolve requirements.lock after editing pyproject.toml (pins that still fit are kept);
# `make lock UPGRADE=1` moves every pin to the newest release that fits. Needs the network (uv, PyPI).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(UV)" "tomli>=2; python_version < '3.11'"
	TORCH="$(TORCH)" $(BIN)/python .ci/lock.py $(if $(UPGRADE),--upgrade)

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
