# Two commands set everything up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch where no NVIDIA GPU is present (2.13.0 is the newest CPU wheel
# on the machines we test on); the default CUDA build otherwise.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo "torch>=2.4,<2.15"; else echo "torch==2.13.0"; fi)
DATA   ?= data/ising-T3.0-L16
RUN    ?= runs/quickstart
PYTEST_ARGS ?=
# Test processes (pytest-xdist): most integration tests launch processes that spend seconds in
# imports, rendezvous and SLURM polling with a core idle, so 2 workers keep both cores busy;
# tests that share a resource, or a module-scoped fixture that launches training, are grouped
# (xdist_group) onto one worker, so that fixture runs once and not once per worker.
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2

.PHONY: venv quickstart test test-unit data clean device-wheels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Default shards: a 2D Ising Monte Carlo data set, written once if absent.
$(DATA)/manifest.json: | venv
	$(PY) -m pipeline shards ising --temperature 3.0 --size 16 --num-samples 2048 --out $(DATA) --seed 0

data: $(DATA)/manifest.json

quickstart: venv data
	$(PY) -m pipeline train --config configs/quickstart.yaml run.dir=$(RUN) data.train_urls=$(DATA)

test: venv data
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -q -ra tests/unit $(PYTEST_ARGS)

# The GPU check machine has no network: the wheels it lacks (computed from pyproject.toml minus
# scripts/device_provided.txt) go into device-wheels/ for scripts/device_check.sh (docs/benchmarks.md).
DEVICE_PYTHON ?= 3.12
device-wheels: venv
	$(PY) scripts/device_wheels.py download --dest device-wheels --python-version $(DEVICE_PYTHON)

clean:
	rm -rf $(VENV) data runs wandb .pytest_cache
