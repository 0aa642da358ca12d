# Two commands on a fresh machine: `make demo` (the main job, CPU default) and `make test` (the suite).
# Both build .venv first (apt + pip, pinned); that is a no-op once it is up to date.
VENV ?= .venv
PY := $(VENV)/bin/python
# The Python 3.12 lane: megatron-core 0.19.x, whose wheel ships Megatron-LM's training loop (tools/setup_env312.sh)
VENV312 ?= .venv312
PY312 := $(VENV312)/bin/python
MEGATRON_SUITE := tests/test_megatron.py tests/test_megatron_checkpoint.py tests/test_megatron_nonfinite.py \
	tests/test_megatron_bad_input.py tests/test_megatron_units.py tests/test_main_job_megatron.py tests/megatron_lm
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export PYTHONWARNINGS ?= ignore::FutureWarning
PYTEST_ARGS ?=

.PHONY: setup setup312 test test311 test312 demo compare lint bench clean

setup:
	@bash tools/setup_env.sh

setup312:
	@bash tools/setup_env312.sh

# Both lanes: everything on Python 3.11 (megatron-core 0.16.1), then the Megatron suite and Megatron-LM's own
# loop (tests/megatron_lm, which needs megatron.training) on Python 3.12 (megatron-core 0.19.x)
test: test311 test312

test311: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) --ignore=tests/megatron_lm tests

test312: setup312
	$(PY312) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) $(MEGATRON_SUITE)

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
	rm -rf $(VENV) $(VENV312) runs outputs .pytest_cache
