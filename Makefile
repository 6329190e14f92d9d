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

.PHONY: help install demo test test-fast lint repro clean-outputs
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
