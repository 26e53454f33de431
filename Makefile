# The two commands a newcomer needs: `make setup` then `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint typecheck contracts pytest native

setup:
	./scripts/setup

# the fleet simulator's compiled modules, after an edit (setup builds them too)
native:
	$(BIN)/python -m snapscale.simulate.native build --if-stale

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

contracts:
	$(BIN)/lint-imports --no-cache

# Integration tests drive real processes (nats-server, CRIU, sandboxes) on a small shared VM:
# a failure gets one rerun, and pytest reports every rerun (R) so a flaky test stays visible.
pytest:
	$(BIN)/python -m pytest --reruns 1 --reruns-delay 1

test: lint typecheck contracts pytest
