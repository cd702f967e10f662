# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
# Both create a virtualenv in .venv with the pinned dependencies from pyproject.toml.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test bench clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; tracetune needs Python 3.11 (set PYTHON=...)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/tracetune run --preset cpu-demo

# Two workers, each taking the next test when it is free (the slow tests differ by
# minutes); TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

bench: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/rewards.py
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/sft.py
	$(BIN)/python bench/grpo.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
