# Two commands do everything on a fresh machine: `make test` and `make run`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test run demo lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch comes from the local wheel cache; a bare `torch` would pull CUDA.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The main job: dense -> warmup -> sparse on the embedded default config (configs/tiny.yaml).
run: $(STAMP)
	$(VENV)/bin/dsa-train

# A 5-second forward/backward of the reference DSA layer.
demo: $(STAMP)
	$(VENV)/bin/dsa-run

lint: $(STAMP)
	$(VENV)/bin/ruff check dsa_dist kernels tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
