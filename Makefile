# The two commands: `make serve` and `make test`. Each bootstraps .venv from a bare Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: serve test lint bench-offline fetch clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build that lies on this machine's disk; pyproject accepts a range it satisfies.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Tests also cover the optional extras; `make serve` stays without them.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,structured,fuzz]'
	touch $(TEST_STAMP)

fetch: $(STAMP)
	$(BIN)/tailserve fetch

serve: fetch
	$(BIN)/tailserve serve --host $(HOST) --port $(PORT) $(ARGS)

test: fetch $(TEST_STAMP)
	# The second real model, for the Gemma 3 tests (make serve does not need it).
	$(BIN)/tailserve fetch --model gemma3-270m
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-offline: fetch
	$(BIN)/python benchmarks/offline.py $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
