# cluster_pipeline: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
NPROC  ?= 2

.PHONY: venv demo demo-shards test lint format bench bench-quality clean

venv: $(STAMP)

# torch is pinned and installed first: 2.13.0 is the CPU build on this machine; an unpinned
# torch would pull several GB of CUDA wheels.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[demo,dev]'
	touch $(STAMP)

data/mnist5k/index.json: $(STAMP)
	$(PY) -m cluster_pipeline make-shards --source mnist5k --out data/mnist5k --samples-per-shard 700

demo-shards: data/mnist5k/index.json

# DeepCluster on MNIST-5k, 2 local ranks (torchrun, gloo), about 3 minutes on 2 CPU cores.
demo: data/mnist5k/index.json
	$(PY) -m launch.local --nproc $(NPROC) train --config configs/demo_mnist.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy cluster_pipeline launch

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: bench-quality

# Benchmarks are not tests: they print what they measured and write it to BENCHMARKS.md.
bench-quality: data/mnist5k/index.json
	$(PY) -m bench.quality

clean:
	rm -rf runs data .pytest_cache .mypy_cache .ruff_cache
