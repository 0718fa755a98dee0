# mesacli developer targets. `make run` and `make test` install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow test-distributed lint format clean bench bench-seeds lm-compare

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: install  ## the embedded default job: quick-start LSA-1 / Mesa-1 vs GD-1 and least squares
	$(VENV)/bin/mesacli quickstart

test: install  ## the default test suite (under 10 minutes on 2 CPU cores)
	$(PY) -m pytest -q

test-slow: install  ## the long tests only
	$(PY) -m pytest -q -m slow

test-distributed: install  ## all multi-process tests (2 local processes over 127.0.0.1), faults included
	$(PY) -m pytest -q -m "distributed or not distributed" tests/test_distributed.py

bench: install  ## compare attention kernels (time, memory); writes bench.json (several minutes on a CPU)
	$(VENV)/bin/mesacli bench --out bench.json

bench-seeds: install  ## steps/s of 1 seed vs 8 seeds in one program vs 8 runs (LSA-1, Softmax-3); bench_seeds.json
	$(VENV)/bin/mesacli bench-seeds experiments/lsa1_constructed.yaml experiments/softmax3_full.yaml --seeds 8

lm-compare: install  ## 2-layer language models (softmax then softmax/linear/DPFP/mesa), equal budgets (~20 min CPU)
	$(VENV)/bin/mesacli lm compare experiments/lm-2l-softmax.yaml experiments/lm-2l-linear.yaml \
		experiments/lm-2l-dpfp.yaml experiments/lm-2l-mesa.yaml --out-dir runs/lm-compare

lint: install
	$(VENV)/bin/ruff check mesacli tests

format: install
	$(VENV)/bin/ruff format mesacli tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
