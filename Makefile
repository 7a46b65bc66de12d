# imgbatch developer tasks; `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help install test lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/imgbatch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/imgbatch ## create .venv and install imgbatch with its dev tools
	@echo "imgbatch installed: run it as $(BIN)/imgbatch, or 'source $(BIN)/activate' first"

test: $(BIN)/imgbatch ## run the test suite
	$(BIN)/pytest -q -n 2 --dist loadgroup

lint: $(BIN)/imgbatch ## ruff, mypy and import-linter (the layers: pyproject.toml)
	$(BIN)/ruff check imgbatch tests bench
	$(BIN)/ruff format --check imgbatch tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo --no-cache

bench: $(BIN)/imgbatch ## benchmarks against baselines measured in the same run
	$(BIN)/python -m bench

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/.data
