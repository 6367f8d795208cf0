# Two commands: `make run` (the demo pipeline end to end) and `make test`.
# Both create .venv if missing and install the project with pinned versions.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PROFILE ?= demo
# no phoning home, no progress-bar spam in logs
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export DO_NOT_TRACK = 1
export HF_DATASETS_DISABLE_PROGRESS_BARS = 1
export TOKENIZERS_PARALLELISM = false
# pip on this kind of machine prints one warning per package for its local index: keep the log readable
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: install run test test-fast clean clean-workspace mlflow-ui constraints-gpu

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,services]' 2>&1 | $(QUIET_PIP)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/longshort run --profile $(PROFILE)

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow and not services"

# Pins for GPU workers and the GPU image (README, "Running on a GPU work pool"): the [gpu] extra resolved
# for Linux x86_64 and Python 3.11 with uv, which resolves for another platform without installing it.
constraints-gpu: install
	$(BIN)/pip install -q uv 2>&1 | $(QUIET_PIP)
	$(BIN)/uv pip compile pyproject.toml --extra gpu -c infra/gpu-worker-caps.txt --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --no-emit-package longshort --custom-compile-command "make constraints-gpu" \
	  -o constraints-gpu.txt

# Production-like services on 127.0.0.1 (infra/README.md): PostgreSQL, SeaweedFS S3, MLflow, Prefect, a worker on
# the pool `gpu`. Then `eval "$$($(BIN)/python -m infra.services env)"` points `longshort run` and dvc at them.
.PHONY: services-up services-down
services-up: install
	infra/ensure-postgres.sh
	$(BIN)/python -m infra.services up

services-down:
	$(BIN)/python -m infra.services down

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/workspace/mlflow.db --host 127.0.0.1 --port 5000

clean-workspace:
	rm -rf workspace

clean: clean-workspace
	rm -rf $(VENV) *.egg-info .pytest_cache
