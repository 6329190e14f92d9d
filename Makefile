# Two commands: `make demo` runs the whole chain on the embedded synthetic dataset (CPU);
# `make test` runs the test suite. Both create .venv from scratch when it is missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo

# Offline hygiene (docs/design.md#offline-hygiene); pipeline/env.py sets the same for Python entry points.
export NO_ALBUMENTATIONS_UPDATE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_OFFLINE ?= 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
# DVC stage commands say `python`: make it the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help install lock demo test test-fast lint repro clean-outputs server worker deploy retrain
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# requirements.lock pins every package (direct, transitive, dev tools, the build backend) with its
# hashes; install takes exactly those, then the project itself without dependencies. pip, not uv or
# poetry: only pip reads /etc/xdg/pip (the local torch/torchvision wheels).
LOCK := requirements.lock
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
LOCK_VENV := .venv-lock

$(VENV)/.installed: $(LOCK) pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'pip==$(PIP_VERSION)'
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	@# setuptools' "Editable installation" notice says nothing actionable here
	PYTHONWARNINGS=ignore $(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

install: $(VENV)/.installed ## create .venv and install exactly requirements.lock, then the project

demo: install ## run the whole pipeline (Prefect flow -> DVC stages) on the synthetic dataset, CPU
	$(PY) -m flows.pipeline --profile $(PROFILE)

# Two pytest-xdist workers: alone, the suite keeps one of this machine's two cores busy on average (its
# Prefect servers, workers and stage subprocesses wait a lot). Whole files per worker (--dist loadfile),
# so a file's module fixtures (a Prefect server, a fan-out cluster) start once, in the order
# tests/conftest.py gives (the long end-to-end files first). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: install ## run the test suite (TEST_WORKERS=2 xdist workers)
	$(PYTEST)

test-fast: install ## the test suite without slow-marked tests
	$(PYTEST) -m "not slow"

lint: install ## ruff
	$(VENV)/bin/ruff check pipeline flows tests benchmarks

repro: install ## dvc repro with the current params.yaml
	$(VENV)/bin/dvc repro

# pip-compile (pip-tools) resolves with pip itself, in its own venv so the project's stays exact.
# Existing pins are kept where pyproject still admits them; UPGRADE=1 re-resolves to the newest.
lock: ## re-resolve requirements.lock from pyproject.toml (all extras, build deps, hashes); UPGRADE=1 for newest
	@test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet 'pip==$(PIP_VERSION)' 'pip-tools==$(PIP_TOOLS_VERSION)'
	@sed '1,/^# ---- end of header/d' $(LOCK) > $(LOCK).body  # the pins to keep; the header stays as written
	$(LOCK_VENV)/bin/pip-compile --quiet --all-extras --all-build-deps --allow-unsafe --generate-hashes \
	    --strip-extras --no-emit-index-url --no-emit-find-links --no-header --newline=lf \
	    $(if $(UPGRADE),--upgrade) --output-file $(LOCK).body pyproject.toml
	@{ sed '/^# ---- end of header/q' $(LOCK); cat $(LOCK).body; } > $(LOCK).new
	@rm -f $(LOCK).body && mv $(LOCK).new $(LOCK)

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
