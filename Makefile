# moestream: `make demo` runs the pipeline on embedded defaults; `make test` installs, starts what the
# tests need (a real Kafka broker, a local Ray instance) and runs them.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# uv keeps every wheel it downloads here, so the multi-GB torch wheels are fetched once per machine.
export UV_CACHE_DIR ?= $(HOME)/.cache/uv
export UV_LINK_MODE ?= copy
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration test-reliability bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"moestream needs Python 3.11, found {sys.version}"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -e '.[dev,bench]'
	touch $(STAMP)

demo: install
	$(BIN)/moestream demo

test: install
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest -m "not integration"

test-integration: install
	$(BIN)/python -m pytest -m integration

test-reliability: install  # the fault-injection scenarios of issue 9, with their figures (-s)
	$(BIN)/python -m pytest -m reliability -s

bench: install  # every benchmark, full sizes: benchmarks/results/<date>-<machine>.json and .md
	$(BIN)/moestream bench all

bench-quick: install  # the same at quick sizes
	$(BIN)/moestream bench all --quick

clean:
	rm -rf .moestream .pytest_cache .hypothesis
