# One command per chore. Each target calls a script in scripts/, so everything here also works
# without make: the README's two commands are ./scripts/quickstart.sh and ./scripts/test.sh.
SHELL := /bin/bash
VENV_DIR ?= .venv
export VENV_DIR
BIN := $(VENV_DIR)/bin
BENCH_ARGS ?=

.PHONY: help install install-test demo test test-fast lint format bench dashboard clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install:  ## .venv with torch==2.13.0 (CPU) and the project (editable)
	bash scripts/install.sh

install-test:  ## install plus the test, lint and type-check tools
	bash scripts/install.sh test

demo:  ## API + one worker + examples/digits-random.yaml over HTTP, best configuration printed
	bash scripts/quickstart.sh

test:  ## the whole test suite (what CI runs)
	bash scripts/test.sh

test-fast:  ## the tests not marked slow
	bash scripts/test.sh -m "not slow"

lint:  ## ruff check, ruff format --check, mypy
	bash scripts/lint.sh

format:  ## apply ruff's fixes and formatting
	bash scripts/install.sh test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install  ## benchmarks (bench/run.py); e.g. make bench BENCH_ARGS=--quick
	$(BIN)/python -m bench.run $(BENCH_ARGS)

dashboard: install  ## optuna-dashboard on ./hpo-data on http://127.0.0.1:8080
	$(BIN)/hpo dashboard

clean:  ## remove caches (keeps .venv and hpo-data)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -not -path './$(VENV_DIR)/*' -prune -exec rm -rf {} +
