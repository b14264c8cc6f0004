# vae-study: `make help` lists every target. Variables a user may override are below.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PROFILE      ?= default
STUDY        ?=
DEVICE       ?= auto
JOBS         ?= auto
STORAGE      ?= sqlite:///$(CURDIR)/mlruns/optuna.db
TRACKING_URI ?= sqlite:///$(CURDIR)/mlruns/mlflow.db
HOST         ?= 127.0.0.1
PORT         ?=
STOP_AFTER   ?=
ONLY         ?=
PYTHON       ?= python3

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA_STAMP := data/.verified
# The store URLs reach the commands through the environment, never their command lines, so
# that a PostgreSQL password is neither echoed by make nor visible in a process list.
export VAE_STORAGE = $(STORAGE)
export VAE_TRACKING_URI = $(TRACKING_URI)
CHROMIUM ?= chromium
INITDB   ?= /usr/lib/postgresql/*/bin/initdb
REDACT := sed -E 's\#(://[^:/@]*):[^@]*@\#\1:***@\#g'
RUN_OPTS = --profile $(PROFILE) --jobs $(JOBS) --device $(DEVICE) $(if $(STUDY),--study $(STUDY)) $(if $(STOP_AFTER),--stop-after $(STOP_AFTER)) $(foreach o,$(ONLY),--only $(o))

help: ## list targets and variables
	@echo "vae-study targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "variables: PROFILE=$(PROFILE) STUDY=$(STUDY) DEVICE=$(DEVICE) JOBS=$(JOBS) HOST=$(HOST) PORT=$(PORT)"
	@echo "           STOP_AFTER=$(STOP_AFTER) (minutes; trials then stop at an epoch end, resumable)"
	@echo "           ONLY=$(ONLY) (NAME=VALUE ...: only the grid points that match, e.g. ONLY=variant=vae)"
	@echo "           STORAGE=$${VAE_STORAGE}" | $(REDACT)
	@echo "           TRACKING_URI=$${VAE_TRACKING_URI}" | $(REDACT)

setup: $(STAMP) ## create .venv and install vae-study (reruns only when pyproject.toml changes)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 || $(VENV)/bin/pip install -q torch torchvision
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

data: setup ## fetch MNIST and Fashion-MNIST into data/ and verify their SHA-256
	$(PY) -m study.data --root data

study: setup data ## run the default study suite for PROFILE (or STUDY=name), then build the reports
	$(PY) -m study.runner run $(RUN_OPTS)
	$(MAKE) --no-print-directory report

worker: setup data ## join a running study on a shared STORAGE / TRACKING_URI (STUDY=name required)
	$(PY) -m study.runner run --worker $(RUN_OPTS)

report: setup ## build reports/ (index, loss choice, KL dynamics) from the MLflow runs
	$(PY) -m analysis.report --profile $(PROFILE) --out reports

ui: setup ## serve the MLflow UI on HOST:PORT (default 127.0.0.1:5000)
	$(PY) -m study.runner ui --host $(HOST) --port $(or $(PORT),5000)

dashboard: setup ## serve optuna-dashboard over STORAGE on HOST:PORT (default 127.0.0.1:8080)
	$(PY) -m study.runner dashboard --host $(HOST) --port $(or $(PORT),8080)

# Checked when `system` runs: a missing package for a user who cannot install it is one line
# from make itself ($(error)), exit status 2, before anything else runs.
MISSING_PACKAGES = $(strip $(if $(shell command -v $(CHROMIUM)),,chromium) \
                           $(if $(wildcard $(INITDB)),,postgresql))
CAN_INSTALL = $(and $(filter 0,$(shell id -u)),$(shell command -v apt-get))

system: ## install the Debian packages the tests need (chromium, postgresql) where root, else name them
	$(if $(MISSING_PACKAGES),$(if $(CAN_INSTALL),,$(error the tests need the system packages \
	  $(MISSING_PACKAGES); install them (Debian/Ubuntu: sudo apt-get install -y \
	  $(MISSING_PACKAGES)) and run make test again)))
	@if [ -n "$(MISSING_PACKAGES)" ]; then \
	  packages="$(MISSING_PACKAGES)"; command -v npm >/dev/null || packages="$$packages npm"; \
	  echo "installing the Debian packages the tests need: $$packages"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $$packages || exit 2; \
	fi

test: system setup data ## run every test (pytest); installs chromium and postgresql first where root
	$(PY) -m pytest -q -rs --durations=15

bench: setup data ## measure training speed against the DataLoader baseline -> reports/bench.json
	$(PY) -m study.bench --out reports/bench.json --device $(DEVICE)

lint: setup ## ruff check
	$(VENV)/bin/ruff check study analysis tests

clean: ## remove generated reports and the MLflow/Optuna stores (keeps data/ and .venv)
	rm -rf reports mlruns/* test-artifacts
	touch mlruns/.gitkeep

.PHONY: help setup data study worker report ui dashboard system test bench lint clean
