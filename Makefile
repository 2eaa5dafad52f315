# Two commands from a fresh clone: `make repro` (the pipeline) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch; on a CUDA machine, install your own torch into $(VENV) first and it is kept.
TORCH ?= torch==2.13.0
# Extras to install on top of the core, all at the versions in requirements.lock: dev (tests, ruff) by default;
# `make install EXTRAS=dev,notebooks,ui` adds JupyterLab and optuna-dashboard; team, the PostgreSQL driver that
# `make services` adds by itself.
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

.PHONY: install lock repro test ui clean services services-stop services-status

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

# MLflow UI on the default store (loopback only); MLFLOW_TRACKING_URI users open their server instead. Open the
# address it prints first: the experiment's training runs (not MLflow 3's GenAI overview), resolved from the store.
ui: install
	$(BIN)/python -m pipelines.tracking ui-url --tracking-uri sqlite:///$(abspath mlflow.db)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

# The MLflow UI in headless Chromium (`apt-get install -y chromium`): serves the store on a free loopback port, checks
# that the runs page, the pipeline executions' view and the newest execution's page show the runs, and saves their
# screenshots in reports/ui/. TRACKING_URI=... for another store (default: the stages' own, mlflow.db).
.PHONY: ui-check
ui-check: install
	$(BIN)/python -m pipelines.ui_check $(if $(TRACKING_URI),--tracking-uri $(TRACKING_URI))

# The team's services (pipelines/services.py), under services/ (DALLE_SERVICES_DIR moves it), on 127.0.0.1 only:
# PostgreSQL on PG_PORT (default 55432) with databases mlflow and optuna, an MLflow server on MLFLOW_PORT (55000), and
# a DVC remote directory. Needs the OS's PostgreSQL server (`apt-get install -y postgresql`) and the team extra,
# which `make services` adds to EXTRAS. Starting twice is fine; services-status prints the URLs to export.
TEAM_EXTRAS := $(if $(filter team,$(subst $(comma), ,$(EXTRAS))),$(EXTRAS),$(EXTRAS)$(comma)team)

services:
	$(MAKE) --no-print-directory install EXTRAS=$(TEAM_EXTRAS)
	$(BIN)/python -m pipelines.services start $(if $(PG_PORT),--pg-port $(PG_PORT)) $(if $(MLFLOW_PORT),--mlflow-port $(MLFLOW_PORT))

services-stop:
	$(BIN)/python -m pipelines.services stop

services-status:
	$(BIN)/python -m pipelines.services status

clean:
	rm -rf $(VENV) .pytest_cache
