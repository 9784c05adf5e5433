# Two commands do everything on a fresh machine: `make test` and `make run`.
# In an environment that already has torch (the NGC Docker image, a cluster's Python), `USE_SYSTEM_PYTHON=1`
# (or `VENV=`) skips the .venv and the torch install and uses $(PYTHON) as it is.
PYTHON ?= python3.11
USE_SYSTEM_PYTHON ?= 0
VENV   ?= .venv

ifeq ($(strip $(VENV)),)
USE_SYSTEM_PYTHON := 1
endif

ifeq ($(USE_SYSTEM_PYTHON),1)
PY     := $(PYTHON)
SETUP  := system-python
else
PY     := $(VENV)/bin/python
SETUP  := $(VENV)/.installed
endif

.PHONY: test run demo lint clean system-python

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch comes from the local wheel cache; a bare `torch` would pull CUDA.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

# The environment's own torch (e.g. CUDA torch + Transformer Engine of the NGC image): check, install nothing.
system-python:
	$(PY) -c "import torch, megatron.core, ray, dsa_dist, launch; print('make: using torch', torch.__version__, 'of', torch.__file__)"

test: $(SETUP)
	$(PY) -m pytest -q tests

# The main job through Ray: a local Ray cluster (started and stopped by the driver unless one is running) runs
# dense -> warmup -> sparse on the embedded default config (configs/tiny.yaml) with 2 context-parallel workers.
run: $(SETUP)
	$(PY) -m launch configs/tiny.yaml parallel.cp=2

# A 5-second forward/backward of the reference DSA layer.
demo: $(SETUP)
	$(PY) -m dsa_dist.cli

lint: $(SETUP)
	$(PY) -m ruff check dsa_dist kernels tests benchmarks launch
	PATH="$(abspath $(dir $(PY))):$$PATH" hadolint docker/Dockerfile

clean:
	rm -rf .venv runs .pytest_cache
