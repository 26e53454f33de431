# The two commands a newcomer needs: `make setup` then `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint typecheck contracts pytest

setup:
	./scripts/setup

lint:
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy

contracts:
	$(BIN)/lint-imports

pytest:
	$(BIN)/python -m pytest

test: lint typecheck contracts pytest
