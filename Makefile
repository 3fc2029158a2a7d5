# The two commands a newcomer needs: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test check proto bench dashboard clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: run the provider against an embedded OpenBao and mount an example class
demo: $(STAMP)
	$(BIN)/python -m demo

## test: lint, type-check and run every test against real OpenBao (and PostgreSQL)
test: $(STAMP)
	scripts/install-system-deps
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/check
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/check

## proto: regenerate provider/_proto from proto/service.proto
proto: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/gen-proto

bench: $(STAMP)
	scripts/install-system-deps
	$(BIN)/python -m bench

## dashboard: redraw docs/dashboard.svg from a real run (OpenBao, two providers, Prometheus)
dashboard: $(STAMP)
	scripts/install-system-deps
	$(BIN)/python -m bench.dashboard

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
