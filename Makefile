# cluster_pipeline: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
NPROC  ?= 2

.PHONY: venv demo demo-shards test test-fast lint format bench bench-clustering bench-reader-ab bench-startup bench-datapath bench-verify bench-gather bench-labels bench-scale bench-peers \
	bench-epoch bench-quality bench-specialists bench-activations gpu-check gpu-wheels launch clean

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

# DeepCluster on MNIST-5k, 2 local ranks (launch.local, gloo): 98 s from a fresh clone on 2 AMD
# EPYC cores on 2026-12-04 (131 s on 2026-12-03), about 60 s of it the install; README, "What the demo does".
demo: data/mnist5k/index.json
	$(PY) -m launch.local --nproc $(NPROC) train --config configs/demo_mnist.yaml

# Submit a command to SLURM through submitit (cluster_pipeline/launcher/slurm.py): COMMAND is
# train (default), train-supervised, pretrain-rotnet, clusterfit, extract, evaluate, activations or
# specialists; ARGS holds that command's own options, as `cluster-pipeline COMMAND` takes them,
# e.g. ARGS="--pretrained runs/r/checkpoints/epoch-0030.pt" or ARGS="--checkpoint CKPT --layers
# block2". CONFIG is passed as --config (default configs/demo_mnist.yaml for the commands that
# need one; clusterfit, evaluate, activations and specialists read their weights' saved config
# unless CONFIG is given). Every other variable is optional and overrides the config's slurm
# section: NODES GPUS_PER_NODE TASKS_PER_NODE CPUS_PER_TASK MEM_GB TIME (minutes) PARTITION
# ACCOUNT QOS CONSTRAINT SIGNAL_DELAY_S MAX_TIMEOUTS; RUN_DIR names the run directory;
# OVERRIDES="k=v ...". RESUME=<run dir> resubmits a training run from its last checkpoint with
# its saved config, as the command it was launched with (or COMMAND, when given). The request is
# checked against the partition first (one line per mismatch, exit 2); the GPUs, tasks and CPUs
# per node the config leaves unset fit its nodes. DRY_RUN=1 prints the checks and the sbatch
# script and submits nothing.
COMMAND ?= train
CONFIG ?= $(if $(filter train train-supervised pretrain-rotnet extract,$(COMMAND)),configs/demo_mnist.yaml)
SLURM_VARS := NODES=nodes GPUS_PER_NODE=gpus_per_node TASKS_PER_NODE=tasks_per_node \
	CPUS_PER_TASK=cpus_per_task MEM_GB=mem_gb TIME=timeout_min PARTITION=partition \
	ACCOUNT=account QOS=qos CONSTRAINT=constraint SIGNAL_DELAY_S=signal_delay_s \
	MAX_TIMEOUTS=max_num_timeout
LAUNCH_ARGS = $(if $(filter-out 0,$(DRY_RUN)),--dry-run) $(if $(RESUME),--resume $(RESUME) $(if $(filter-out file,$(origin COMMAND)),$(COMMAND)),$(COMMAND) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)) \
	$(foreach v,$(SLURM_VARS),$(if $($(firstword $(subst =, ,$(v)))),slurm.$(lastword $(subst =, ,$(v)))=$($(firstword $(subst =, ,$(v)))))) \
	$(if $(RUN_DIR),run.dir=$(RUN_DIR)) $(OVERRIDES)

launch: $(STAMP)
	$(PY) -m launch.slurm $(LAUNCH_ARGS)

# Every test: unit, multi-process gloo, end to end, and the SLURM tests, which start a real local
# SLURM (munge, MariaDB, slurmdbd, slurmctld, two slurmd; needs root, apt-installs what is
# missing). Deselect those with: make test PYTEST_ARGS='-m "not slurm"'.
PYTEST_ARGS ?=
test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The unit tests only (no rank processes, no whole runs, no SLURM): under two minutes. Every
# test is marked unit or integration (tests/conftest.py): -m integration runs the others.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy cluster_pipeline launch bench

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Benchmarks are not tests: each prints ratios measured side by side in one run and replaces its
# own section of BENCHMARKS.md (with the machine and commit). Run them on an otherwise idle machine.
bench: bench-clustering bench-startup bench-datapath bench-verify bench-gather bench-labels bench-peers bench-epoch bench-quality bench-specialists \
	bench-activations

# kmeans.cluster_features vs bare faiss and scikit-learn, 100k x 256 -> 1k (about 2 min), and
# 1.28M x 256 -> 10k with LARGE_NITER iterations per side (about 10 min at 3; LARGE_NITER=0 skips).
LARGE_NITER ?= 3
bench-clustering: $(STAMP)
	$(PY) -m bench.clustering $(if $(filter-out 0,$(LARGE_NITER)),--large --large-niter $(LARGE_NITER))

# Shard reader vs a plain PIL decode loop on synthetic JPEGs, workers 0 and nproc (about 2 min).
# The shard reader of this tree against that of BASE (default: main), in one process, in turns.
BASE ?= main
bench-reader-ab: $(STAMP)
	$(PY) -m bench.reader_ab --base $(BASE)

bench-datapath: $(STAMP)
	$(PY) -m bench.datapath

# An attempt's start-up (launcher to first training step) of this tree against BASE, 3 pairs of
# 1-epoch digits runs in turns (about 2 min): make bench-startup BASE=9bf54a2.
BASE_STARTUP ?= 9bf54a2
bench-startup: $(STAMP)
	$(PY) -m bench.startup --base $(or $(BASE),$(BASE_STARTUP))

# make-shards --verify vs --no-verify on 10k ImageNet-size JPEGs in class folders, 2 workers:
# images/s of each and their ratio (about 2 min on 2 cores, half of it writing the tree).
bench-verify: $(STAMP)
	$(PY) -m bench.verify

# gather_features on 2 gloo ranks: rank 0's peak memory and time per GB (under a minute).
bench-gather: $(STAMP)
	$(PY) -m bench.gather

# The label path (broadcast, NMI, sampler, checkpoint) at N = 100M on 2 ranks: time and memory
# per rank (about 1.5 min, 2 GB per rank).
bench-labels: $(STAMP)
	$(PY) -m bench.labels

# The project against the code users would otherwise run, interleaved pairs: DeepCluster's faiss
# recipe, webdataset's loader, a bare DDP loop, a model-only forward (about 15 min).
bench-peers: $(STAMP) data/mnist5k/index.json
	$(PY) -m bench.peers

# ImageNet's count (1,281,167 synthetic samples) through one DeepCluster epoch with k = 10,000 on
# 2 ranks, gather and sharded modes: each phase's time, time per sample, peak RSS, /dev/shm
# (about 30 min and 4.3 GB of shards in data/; not part of `make bench`).
bench-scale: $(STAMP)
	$(PY) -m bench.scale

# The demo's epoch: extraction I/O + gather + clustering + broadcast vs model compute (about 2 min).
bench-epoch: data/mnist5k/index.json
	$(PY) -m bench.epoch

# DeepCluster's claim in miniature: k-means on learned features vs pixels and a random network;
# then the methods table: linear probes per layer, kNN and NMI for random init, RotNet,
# ClusterFit(RotNet), DeepCluster, ClusterFit(DeepCluster) and supervised (about 15 min a seed).
bench-quality: data/mnist5k/index.json
	$(PY) -m bench.quality
	$(PY) -m bench.methods

# Specialist groups (Hinton et al. 2015, 5.3) vs the generalist's test confusions: train-supervised,
# then `specialists` on 2 local ranks, correlation and covariance columns (about 3 min).
bench-specialists: data/mnist5k/index.json
	$(PY) -m bench.specialists

# k-means on each layer's activations (random init vs DeepCluster), NMI per layer (about 3 min).
bench-activations: data/mnist5k/index.json
	$(PY) -m bench.activations

# The GPU path on one lent GPU (an H200 here), under 6 minutes: torch k-means at ImageNet's
# shape, GPU PCA, ResNet-50 bf16 extraction from shards, a 2-epoch DeepCluster run; figures to
# $$OUT/gpu_check.json (bench/gpu_check.py). It needs torch, numpy, scipy, scikit-learn,
# pillow and pyyaml, plus the wheels of `make gpu-wheels` (.whl/, under 1 MiB), installed by
# this target when .whl/ is there. On a CPU: python -m bench.gpu_check --cpu (the suite runs it).
gpu-check:
	if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target /tmp/site .whl/*.whl; fi; \
	PYTHONPATH=/tmp/site:$$PWD PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out $${OUT:-.}

# The wheels the GPU machine lacks, for Python 3.12 (its Python), into .whl/ (git-ignored).
GPU_WHEELS := omegaconf==2.4.0 simplejpeg==1.9.0
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf runs data .pytest_cache .mypy_cache .ruff_cache
