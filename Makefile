# moestream: `make demo` runs the pipeline on embedded defaults; `make test` installs, starts what the
# tests need (a real Kafka broker, a local Ray instance) and runs them.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
# The interpreter's own path, not a pyenv shim's: `uv sync --python <shim>` recreates .venv on every run.
PYTHON_EXE = $(shell $(PYTHON) -c 'import sys; print(sys.executable)')
VENV := .venv
BIN := $(VENV)/bin
# uv, pinned, in a venv of its own: `uv sync` leaves in .venv exactly what uv.lock lists, so it would remove
# a uv installed there.
UV_VERSION := 0.13.9
UV_VENV := .tools/uv-$(UV_VERSION)
UV := $(UV_VENV)/bin/uv
# uv keeps every wheel it downloads here, so the multi-GB torch wheels are fetched once per machine.
export UV_CACHE_DIR ?= $(HOME)/.cache/uv
export UV_LINK_MODE ?= copy
STAMP := $(VENV)/.installed
# protoc and the gRPC plugin, pinned, in a venv of their own like uv: only `make proto` needs them, and the code
# they generate (serving/proto/*_pb2*.py) is checked in. Its protobuf must not be newer than the runtime's
# (pyproject.toml's lower bound on protobuf names the version the checked-in code was generated with).
GRPC_TOOLS_VERSION := 1.85.1
GRPC_TOOLS := .tools/grpcio-tools-$(GRPC_TOOLS_VERSION)/bin/python

.PHONY: install lock lock-check proto demo test test-unit test-integration test-reliability bench bench-quick clean

install: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# .venv holds exactly the versions in uv.lock (the project itself editable); --locked fails if
# pyproject.toml and uv.lock disagree.
$(STAMP): pyproject.toml uv.lock Makefile $(UV)
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"moestream needs Python 3.11, found {sys.version}"'
	$(UV) sync --locked --extra dev --extra bench --python $(PYTHON_EXE) --compile-bytecode
	touch $(STAMP)

# After a pyproject.toml edit; keeps every locked version that still fits. Upgrades:
# make lock LOCK_ARGS='--upgrade-package torch', or LOCK_ARGS=--upgrade for everything.
lock: $(UV)
	$(UV) lock $(LOCK_ARGS)

lock-check: $(UV)  # fails when pyproject.toml and uv.lock disagree
	$(UV) lock --check

$(GRPC_TOOLS):
	$(PYTHON) -m venv .tools/grpcio-tools-$(GRPC_TOOLS_VERSION)
	$@ -m pip install --quiet --disable-pip-version-check grpcio-tools==$(GRPC_TOOLS_VERSION)

# After a serving/proto/*.proto edit: regenerate the Python modules beside it (checked in).
proto: $(GRPC_TOOLS)
	$(GRPC_TOOLS) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. serving/proto/*.proto

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
