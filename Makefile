# Two commands: `make run` starts everything, `make test` runs the test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test venv lint bench bench-status bench-soak bench-faults bench-throughput bench-scheduling bench-learning bench-batching bench-overhead bench-placement bench-affinity bench-metrics clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first and pinned: an unpinned torch (pulled in by transformers/accelerate) resolves
	@# to a newer release with several GB of CUDA libraries.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

run: $(STAMP)
	$(PY) scripts/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy config gpuscheduler personas

# Benchmarks (not tests): each prints a table and, where there is a baseline, the ratio.
bench: bench-status bench-metrics bench-throughput bench-scheduling bench-learning bench-batching bench-overhead bench-placement bench-affinity bench-soak bench-faults

bench-status: $(STAMP)
	$(PY) bench/bench_status_page.py

bench-metrics: $(STAMP)
	$(PY) bench/bench_metrics.py

bench-throughput: $(STAMP)
	$(PY) bench/bench_throughput.py

bench-scheduling: $(STAMP)
	$(PY) bench/bench_scheduling.py

bench-learning: $(STAMP)
	$(PY) bench/bench_learning.py

bench-batching: $(STAMP)
	$(PY) bench/bench_batching.py

bench-affinity: $(STAMP)
	$(PY) bench/bench_affinity.py

bench-overhead: $(STAMP)
	$(PY) bench/bench_overhead.py

bench-placement: $(STAMP)
	$(PY) bench/bench_placement.py

bench-soak: $(STAMP)
	$(PY) bench/bench_soak.py

bench-faults: $(STAMP)
	$(PY) bench/bench_faults.py

clean:
	rm -rf $(VENV) var/test
