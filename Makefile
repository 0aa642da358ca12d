# Two commands on a fresh machine: `make demo` (the main job, CPU default) and `make test` (the suite).
# Both build .venv first (apt + pip, pinned); that is a no-op once it is up to date.
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export PYTHONWARNINGS ?= ignore::FutureWarning
PYTEST_ARGS ?=

.PHONY: setup test demo compare lint bench clean

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

demo: setup
	bash launch/demo.sh

# Optimizers side by side on the main job (docs/compare.md); options through COMPARE_ARGS="--steps 100 ..."
COMPARE_ARGS ?=
compare: setup
	$(PY) launch/compare.py $(COMPARE_ARGS)

lint: setup
	$(PY) -m ruff check sinkgd_ds megatron_patch launch tests benchmarks tools

bench: setup
	$(PY) benchmarks/step_benchmark.py
	$(PY) benchmarks/step_breakdown.py

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
