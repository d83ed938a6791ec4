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
