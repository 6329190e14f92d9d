# Two commands: `make demo` runs the whole chain on the embedded synthetic dataset (CPU);
# `make test` runs the test suite. Both create .venv from scratch when it is missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo

# Offline hygiene (design.md section 5); pipeline/env.py sets the same for Python entry points.
export NO_ALBUMENTATIONS_UPDATE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_OFFLINE ?= 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
# DVC stage commands say `python`: make it the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help install demo test test-fast lint repro clean-outputs server worker deploy retrain
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed ## create .venv and install the project (+ dev tools)

demo: install ## run the whole pipeline (Prefect flow -> DVC stages) on the synthetic dataset, CPU
	$(PY) -m flows.pipeline --profile $(PROFILE)

test: install ## run the test suite
	$(PY) -m pytest

test-fast: install ## the test suite without slow-marked tests
	$(PY) -m pytest -m "not slow"

lint: install ## ruff
	$(VENV)/bin/ruff check pipeline flows tests benchmarks

repro: install ## dvc repro with the current params.yaml
	$(VENV)/bin/dvc repro

clean-outputs: ## remove pipeline outputs (not the DVC cache)
	rm -rf data models reports submissions

# ---------------------------------------------------------------- Prefect deployments (docs/deploy.md)
PREFECT_PORT ?= 4200
POOL ?= statefarm-pool
PREFECT := $(VENV)/bin/prefect
# Only these targets talk to the local server; `make demo`/`make test` keep their ephemeral API.
server worker deploy retrain: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
server worker deploy retrain: export PREFECT_CLI_PROMPT := false

server: install ## local Prefect server (SQLite, 127.0.0.1:4200) + a process worker; Ctrl-C stops both
	$(PY) -m flows.local --port $(PREFECT_PORT) --pool $(POOL)

worker: install ## one more process worker on the pool (e.g. on another machine with this checkout)
	$(PREFECT) worker start --pool $(POOL) --type process

deploy: install ## register prefect.yaml's deployments (full, weekly retrain, submit) on the server
	@$(PREFECT) work-pool inspect $(POOL) >/dev/null 2>&1 || $(PREFECT) work-pool create $(POOL) --type process
	PWD=$(CURDIR) $(PREFECT) --no-prompt deploy --all

retrain: install ## trigger the retrain deployment now and wait for it
	$(PREFECT) deployment run 'statefarm-retrain/weekly' --watch
