# The two set-up commands (see README.md):
#   make run    start the MTA on its embedded default (spool/, self-signed TLS,
#               127.0.0.1:8465 implicit TLS and 127.0.0.1:8587 STARTTLS)
#   make test   install everything the tests need, then lint, type-check, test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run install test deps lint typecheck unit e2e clean

$(STAMP): setup.cfg pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q -e . --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/twistd -n --pidfile= mta

# System tools the end-to-end tests drive (real clients): swaks, Node.js.
deps: $(STAMP)
	bash scripts/install-test-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check mta tests twisted bench
	$(BIN)/ruff format --check mta tests twisted bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not e2e"

e2e: deps
	$(BIN)/pytest -m e2e

test: deps lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
