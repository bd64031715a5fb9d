# espbridge — `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
STATE  := $(or $(ESPBRIDGE_STATE_DIR),$(CURDIR)/.run)
ENVF   := $(STATE)/espbridge.env
PYTEST_ARGS ?=
TEST_WORKERS ?= 3

.PHONY: help setup up down status migrate lint typecheck test test-unit check demo demo-sync demo-stop bench clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.synced: pyproject.toml uv.lock
	@command -v uv >/dev/null || python3 -m pip install --quiet --disable-pip-version-check uv
	uv sync --frozen --quiet
	@touch $@

setup: $(VENV)/.synced ## install Python dependencies (uv, from uv.lock) and the servers' packages and jars
	infra/local.sh install

up: setup ## start Kafka, PostgreSQL, the SFTP server and the Kafka Connect worker (what is not running) and migrate the database
	infra/local.sh up
	set -a; source $(ENVF); set +a; $(VENV)/bin/espbridge db migrate

down: demo-stop ## stop the demo's processes and the servers that `make up` started
	infra/local.sh down

status: ## show each server with its address and state
	infra/local.sh status

migrate: $(VENV)/.synced ## apply pending database migrations
	set -a; source $(ENVF); set +a; $(VENV)/bin/espbridge db migrate

lint: $(VENV)/.synced ## ruff (format check + lint) and the import-layer contracts
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: $(VENV)/.synced ## mypy --strict over shared, services and tests
	$(VENV)/bin/mypy

test-unit: $(VENV)/.synced ## unit tests only (no servers)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test: lint typecheck ## linters, type checks, then the whole suite against real servers (TEST_WORKERS=3 processes)
	tests/with-servers.sh $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

check: test ## everything CI runs

RECIPIENTS ?= 100000
ESP ?= sandbox

demo: up ## one broadcast through the pipeline against the sandbox ESP and its funnel (ESP=sandbox|generic_sftp|instiller|optimizely|mailup|deployteq)
	set -a; source $(ENVF); set +a; $(PY) -m tools.demo run --recipients $(RECIPIENTS) --esp $(ESP)

# demo-sync's ESP is MailUp unless ESP is given (make's own default above is for `make demo`)
SYNC_ESP = $(if $(filter command line environment,$(origin ESP)),$(ESP),mailup)

demo-sync: up ## subscriptions in sync both ways: a CRM opt-out reaching the ESP, an ESP unsubscribe the CRM, timed (ESP=mailup|sandbox|instiller|optimizely|deployteq)
	set -a; source $(ENVF); set +a; $(PY) -m tools.demo_sync run --esp $(SYNC_ESP)

demo-stop: ## stop the sandbox ESP and the services `make demo` or `make demo-sync` started, and turn off demo-sync's capture
	@if [ -x $(PY) ]; then $(PY) -m tools.demo stop; fi
	@if [ -x $(PY) ] && [ -f $(ENVF) ]; then set -a; source $(ENVF); set +a; $(PY) -m tools.demo_sync stop; fi

QUICK ?=
BENCH_TIMEOUT ?= 7200

bench: up ## measure espbridge against this machine's limits (QUICK=1: a few minutes) → bench/results/latest.json, docs/performance.md
	set -a; source $(ENVF); set +a; timeout --signal=INT --kill-after=120 $(BENCH_TIMEOUT) $(PY) -m bench $(if $(QUICK),--quick)

clean: ## remove the virtualenv and caches (not the servers' data: see `make down`)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
