# SPDX-License-Identifier: Apache-2.0
# The two commands a newcomer needs; each sets itself up from nothing in ./.venv:
#   make test    build lora_kernels (C++ always; CUDA where a GPU is visible or LORA_KERNELS_CUDA=1) and run the tests
#   make bench   the same set-up, then the default benchmark (~2-3 min on a 2-core CPU): table, JSON + PNG in bench/out/
# Other targets: setup, build, bench-full, sdist, sdist-check, lint, clean (`make help`).
# To add a target: declare it in .PHONY, depend on `build` if it imports lora_kernels, and add a line to `help`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
BENCH_ARGS ?=

.PHONY: help setup build test bench bench-full sdist sdist-check lint clean

help:
	@echo "make test         set up ./.venv, build, run the test suite"
	@echo "make bench        set up, build, default benchmark (bench/out/: JSON + PNG); BENCH_ARGS='...' passes options"
	@echo "make bench-full   the long CPU benchmark (today's three shapes, ~30 min on 2 cores)"
	@echo "make sdist        build dist/lora_kernels-<version>.tar.gz"
	@echo "make sdist-check  build the sdist, check its contents, install it into a fresh venv and smoke-test it"
	@echo "make peft-suite   PEFT's own LoRA tests, plainly and patched (PEFT_SUITE_ARGS=--full: every LoRA file)"
	@echo "make gpu-check    on a machine with one NVIDIA GPU: CUDA build, gpu tests, GPU benchmark (<= 8 min)"
	@echo "make lint         ruff check (installs ruff into ./.venv on first use)"
	@echo "make clean        remove build outputs and benchmark scratch"

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
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
	$(PY) -m bench --plot $(BENCH_ARGS)

bench-full: build
	$(PY) -m bench --full --plot $(BENCH_ARGS)

sdist: setup
	rm -rf dist
	$(PY) -m build --sdist --outdir dist .

sdist-check: sdist
	PYTHON=$(PY) .ci/sdist-check dist/lora_kernels-*.tar.gz

lint: setup
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install -q ruff
	$(PY) -m ruff check .

clean:
	rm -rf build dist lora_kernels/_C*.so *.egg-info bench/out examples/out

# PEFT's own LoRA tests (from the installed peft version's sdist), run plainly and with every PEFT
# model patched; fails on a patched-only failure. PEFT_SUITE_ARGS=--full: every LoRA-related file.
.PHONY: peft-suite
PEFT_SUITE_ARGS ?=
peft-suite: build
	$(PY) tests/peft_suite/run.py $(PEFT_SUITE_ARGS)

# make gpu-check: on a machine with one NVIDIA GPU, the same set-up, then the build with the CUDA
# kernels forced, every gpu-marked test and the GPU benchmark (bench/results/<gpu>-*.json + PNG):
# build, tests and benchmark held to GPU_CHECK_SECONDS (8 minutes) by timeout (the one-time venv
# download is not counted); tests/gpu_check.sh prints each step with its time.
GPU_CHECK_SECONDS ?= 480
.PHONY: gpu-check
gpu-check: setup
	@start=$$(date +%s); \
	LORA_KERNELS_CUDA=1 timeout $(GPU_CHECK_SECONDS) $(MAKE) --no-print-directory build || { echo "gpu-check: build failed or ran out of time"; exit 1; }; \
	echo "[gpu-check +$$(( $$(date +%s) - start ))s] built"; \
	GPU_CHECK_START=$$start GPU_CHECK_SECONDS=$(GPU_CHECK_SECONDS) tests/gpu_check.sh $(PY)
