# The two commands a newcomer needs; each sets itself up from nothing in ./.venv:
#   make test    build lora_kernels (C++ always, CUDA when nvcc is found) and run the test suite
#   make bench   the same set-up, then the benchmark table + JSON (bench/results/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
BENCH_ARGS ?=

.PHONY: test bench setup build clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.deps

# In-place build (incremental through ./build), then an editable install of the sources (no second build).
build: setup
	$(PY) setup.py -q build_ext --inplace
	LORA_KERNELS_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q

bench: build
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf build lora_kernels/_C*.so *.egg-info

# PEFT's own LoRA tests (from the installed peft version's sdist), run plainly and with every PEFT
# model patched; fails on a patched-only failure. PEFT_SUITE_ARGS=--full: every LoRA-related file.
.PHONY: peft-suite
PEFT_SUITE_ARGS ?=
peft-suite: build
	$(PY) tests/peft_suite/run.py $(PEFT_SUITE_ARGS)
