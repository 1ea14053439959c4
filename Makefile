# The README's two commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test bench gpu-check deploy serve clean

setup: $(STAMP)

# constraints.txt pins every package we test against, torch==2.13.0 (the CPU
# wheel on disk) included, so a fresh machine reproduces CI exactly.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,postgres,s3]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ckptflow run

# Tests that only run short CLI processes: no Prefect server, no training race, no timing asserted.
# `make test` runs them two at a time (pytest-xdist), then every other test one at a time — together
# exactly the tests of `pytest tests`. Timing-sensitive suites (kill drills, concurrency, leases, DDP,
# e2e, benchmarks) never share the cores with another test.
SIDE_BY_SIDE := $(sort $(wildcard tests/integration/test_bad_input_*.py)) \
	tests/integration/test_cli_bad_input.py tests/integration/test_readonly.py \
	tests/integration/test_no_server_answers.py tests/unit/test_paths_property.py
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider

test: $(STAMP)
	$(PYTEST) -n 2 $(SIDE_BY_SIDE); side=$$?; \
	$(PYTEST) $(addprefix --ignore=,$(SIDE_BY_SIDE)) tests; rest=$$?; \
	test $$side -eq 0 && test $$rest -eq 0

# Only `make bench` drops the page cache (cold reads in bench_integrity; needs root); `make test` never does.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --drop-caches

# DDP on every visible GPU, a rank killed and resumed (benchmarks/gpu_check.py); without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

deploy: $(STAMP)
	bash deployments/deploy.sh

serve: $(STAMP)
	$(BIN)/ckptflow serve

clean:
	rm -rf .ckptflow build *.egg-info src/*.egg-info
