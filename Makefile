# gpuctl developer commands. Each target bootstraps .venv itself, so any of them can be the
# first command on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PB_OUT := src/gpuctl/api/_pb

.PHONY: demo test test-fast proto proto-check lint fmt clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gpuctl.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

proto: $(STAMP)
	$(PY) -m gpuctl.api.codegen $(PB_OUT)

proto-check: $(STAMP)
	$(PY) -m pytest -q tests/test_proto_fresh.py

lint: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

fmt: $(STAMP)
	$(PY) -m ruff format src tests
	$(PY) -m ruff check --fix src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

# Benchmark B1 (BENCHMARKS.md): the FGD protocol on the Alibaba GPU trace 2023, four packing
# policies side by side over seeds 42-51; bench-fgd-mixes compares gpuctl with FGD on workload
# mixes reshaped from the same file (gpuctl.sim.mix). Figures land in bench-results/.
TRACES ?= ../shared/traces
FGD_TRACE := $(TRACES)/alibaba-gpu-v2023
.PHONY: bench-fgd bench-fgd-mixes
bench-fgd: $(STAMP)
	@mkdir -p bench-results
	$(VENV)/bin/gpuctl simulate fgd --nodes $(FGD_TRACE)/openb_node_list_gpu_node.csv \
		--pods $(FGD_TRACE)/openb_pod_list_default.csv --seeds 42-51 \
		--policy bestfit --policy random --policy fgd --policy gpuctl \
		--json bench-results/fgd-default.json

bench-fgd-mixes: $(STAMP)
	@mkdir -p bench-results
	$(VENV)/bin/gpuctl simulate fgd --nodes $(FGD_TRACE)/openb_node_list_gpu_node.csv \
		--pods $(FGD_TRACE)/openb_pod_list_default.csv --seeds 42-51 \
		--policy fgd --policy gpuctl --mixes --json bench-results/fgd-mixes.json

# Benchmark B1 (gangs): one Gavel/Philly-derived trace replayed through core.schedule under
# FIFO, FIFO+backfill and the default policy; average JCT, queueing delay, GPU utilisation.
GANG_TRACE ?= $(TRACES)/gavel/msr/seed=0/ee9e8c.trace
.PHONY: bench-gang
bench-gang: $(STAMP)
	@mkdir -p bench-results
	$(VENV)/bin/gpuctl simulate gang --trace $(GANG_TRACE) --json bench-results/gang-ee9e8c.json

# Benchmark B2: the scheduling core at scale. Synthetic clusters of 1,000 and 10,000 8-GPU
# nodes (mixed SKUs, several fabrics and leaves, 60 % used) with 10,000 and 100,000 pending
# training gangs and inference replica sets: inference placements/s, one 512-GPU gang, the
# burst cycle and the steady cycles after it, peak RSS; each size in its own process.
.PHONY: bench-scale
bench-scale: $(STAMP)
	@mkdir -p bench-results
	$(VENV)/bin/gpuctl simulate scale --json bench-results/scale.json

# A digest of every decision the core makes over B2-style inputs (~4 minutes): a change meant to
# keep every decision must print the same digests before and after.
.PHONY: decisions-digest
decisions-digest: $(STAMP)
	$(PY) -m gpuctl.sim.digest

# Benchmark B4: the cost of a fleet. One mixed workload (a week of the Gavel trace's training
# gangs from day 10, plus three inference services on a diurnal curve) against
# config/catalog.csv on four fleets: a training-shaped fleet sized for the peak, the cheapest
# instance per job with a 5-minute idle timer, a Karpenter-provisioned cluster, gpuctl leasing
# through the core.
COST_TRACE ?= $(TRACES)/gavel/msr/seed=0/ee9e8c.trace
.PHONY: bench-cost
bench-cost: $(STAMP)
	@mkdir -p bench-results
	$(VENV)/bin/gpuctl simulate cost --trace $(COST_TRACE) --json bench-results/cost.json
	$(VENV)/bin/gpuctl simulate cost --workload w2 --json bench-results/cost-w2.json
	$(VENV)/bin/gpuctl simulate cost --workload w3 --json bench-results/cost-w3.json

# RPC fuzzing: 10,000 random, mutated and undecodable requests, with every kind of credential,
# against a gpuctld of its own on loopback (gpuctl.fuzz); fails on a crash, INTERNAL, UNKNOWN,
# a hang, a permission breach or stored data that no longer reads back.
.PHONY: fuzz
fuzz: $(STAMP)
	@mkdir -p bench-results
	$(PY) -m gpuctl.fuzz --messages 10000 --json bench-results/fuzz.json

# Benchmark B3: the API under load. A grpc.aio load generator in 4 processes (one caller
# each) against a gpuctld of its own on loopback, at 32 and 500 calls in flight, with 0, 30,000
# and 1,000,000 jobs stored, beside a trivial grpc.aio health server measured in the same run
# (this machine's ceiling); ~7 minutes. bench-api-postgres: the same on PostgreSQL
# ($$GPUCTL_TEST_POSTGRES_URL, default 127.0.0.1:5432/test, in a schema of its own).
BENCH_API_CASES := --inflight 32 --inflight 500 --stored 0 --stored 30000
.PHONY: bench-api bench-api-postgres bench-api-workers
bench-api: $(STAMP)
	@mkdir -p bench-results
	$(PY) -m gpuctl.bench_api $(BENCH_API_CASES) --stored 1000000 --json bench-results/api.json

# bench-api-workers: gpuctld alone against gpuctld with one API worker, interleaved, 3 rounds,
# each load process on 8 connections (as many clients); ~8 minutes.
bench-api-workers: $(STAMP)
	@mkdir -p bench-results
	$(PY) -m gpuctl.bench_api --inflight 32 --call CreateJob --call GetJob --call ListJobs \
		--api-workers 0 --api-workers 1 --channels 8 --rounds 3 --seconds 6 \
		--json bench-results/api-workers.json

bench-api-postgres: $(STAMP)
	@mkdir -p bench-results
	$(PY) -m gpuctl.bench_api $(BENCH_API_CASES) --json bench-results/api-postgres.json \
		--store-url $${GPUCTL_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}

# A day of an inference service through gpuctld's own controller (injected clock): availability,
# time to replace a failed replica, node-hours with scale-down; default policy, then packed
# (spread=0). ~8 minutes each.
.PHONY: bench-service
bench-service: $(STAMP)
	@mkdir -p bench-results
	$(PY) -m gpuctl.bench_service --json bench-results/service.json
	$(PY) -m gpuctl.bench_service --weight spread=0 --json bench-results/service-packed.json

# High availability: kill -9 the leading gpuctld under a submit storm with a gang running, two
# gpuctld on one PostgreSQL ($$GPUCTL_TEST_POSTGRES_URL, default 127.0.0.1:5432/test).
.PHONY: bench-failover
bench-failover: $(STAMP)
	@mkdir -p bench-results
	$(PY) -m gpuctl.bench_failover --rounds 5 --json bench-results/failover.json

# kill -9 the agent of one node of a running gang, at the default timings: fenced, lost, running
# again elsewhere (seconds from the kill), and any overlap of the old rank with its copy.
.PHONY: bench-nodeloss
bench-nodeloss: $(STAMP)
	@mkdir -p bench-results
	$(PY) -m gpuctl.bench_nodeloss --rounds 3 --json bench-results/nodeloss.json
