# The README's two commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup bytecode run test bench gpu-check deploy serve clean

setup: $(STAMP)

# constraints.txt pins every package we test against, torch==2.13.0 (the CPU
# wheel on disk) included, so a fresh machine reproduces CI exactly.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,postgres,s3]'
	$(MAKE) --no-print-directory bytecode
	touch $(STAMP)

# An editable install leaves our own modules uncompiled (pip compiles a wheel's); where Python may not
# write bytecode (PYTHONDONTWRITEBYTECODE) every `ckptflow` process would compile them again (~0.1 s).
bytecode:
	$(BIN)/python -m compileall -q src flows tasks deployments > /dev/null

run: $(STAMP)
	$(BIN)/ckptflow run

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

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
