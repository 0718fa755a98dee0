# mesacli developer targets. `make run` and `make test` install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow test-distributed test-faults lint format clean bench bench-seeds bench-train lm-compare paper-probe paper-icl \
	reproduce report

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: install  ## the embedded default job: quick-start LSA-1 / Mesa-1 vs GD-1 and least squares
	$(VENV)/bin/mesacli quickstart

# TEST_WORKERS: pytest-xdist processes (one per core); each test file runs in one of them (its module fixtures once)
TEST_WORKERS ?= 2

test: install  ## the default test suite (under 10 minutes on 2 CPU cores; TEST_WORKERS=0 runs it in one process)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: install  ## the long tests only
	$(PY) -m pytest -q -m slow

test-distributed: install  ## all multi-process tests (2 local processes over 127.0.0.1), faults included
	$(PY) -m pytest -q -m "distributed or not distributed" tests/test_distributed.py

test-faults: install  ## every fault of tests/test_faults.py, the random-moment signals repeated (ROUNDS=3 each)
	MESACLI_FAULT_ROUNDS=$(or $(ROUNDS),3) $(PY) -m pytest -q -m "faults or not faults" tests/test_faults.py

bench: install  ## compare attention kernels (time, memory); writes bench.json (several minutes on a CPU)
	$(VENV)/bin/mesacli bench --out bench.json

bench-seeds: install  ## steps/s of 1 seed vs 8 seeds in one program vs 8 runs (LSA-1, Softmax-3); bench_seeds.json
	$(VENV)/bin/mesacli bench-seeds experiments/lsa1_constructed.yaml experiments/softmax3_full.yaml --seeds 8

# The paper specs of the reproduction ledger (mesacli/reproduce/ledger.yaml), at their full size.
BENCH_TRAIN_SPECS ?= lsa1_constructed lsa2_constructed lsa4_constructed lsa6_constructed mesa1_constructed \
	softmax3_full softmax7_full hybrid_mesa_full icl_softmax7_t224

bench-train: install  ## s/step, matmul GFLOP/step and mfu of the paper specs' training steps; bench_train.json (~5 min CPU)
	$(VENV)/bin/mesacli bench-train $(BENCH_TRAIN_SPECS) --out bench_train.json

lm-compare: install  ## 2-layer language models (softmax then softmax/linear/DPFP/mesa/MesaNet), equal budgets (~35 min CPU)
	$(VENV)/bin/mesacli lm compare experiments/lm-2l-softmax.yaml experiments/lm-2l-linear.yaml \
		experiments/lm-2l-dpfp.yaml experiments/lm-2l-mesa.yaml experiments/lm-2l-mesanet.yaml --out-dir runs/lm-compare

# The paper's full-size section-4 and section-5 experiments, end to end (resumable: rerun after an interruption).
# RUNS sets where the run directories go; TRAIN_ARGS is passed to every `mesacli train` (e.g. --set train.steps=100).
RUNS ?= runs
TRAIN_ARGS ?=
TUNE_STEPS ?= 5000

paper-probe: install  ## LSA-1, LSA-6 (constructed tokens) and Softmax-7, then every probe analysis (2-core CPU: ~2.5 h)
	for spec in lsa1_constructed lsa6_constructed softmax7_full; do \
		$(VENV)/bin/mesacli train experiments/$$spec.yaml --run-dir $(RUNS)/$$spec --no-progress $(TRAIN_ARGS) && \
		$(VENV)/bin/mesacli eval $(RUNS)/$$spec && \
		$(VENV)/bin/mesacli probe $(RUNS)/$$spec || exit 1; \
	done

paper-icl: install  ## the T=224 Softmax-7, prompt-tune EOS then prefix, icl-eval plain/EOS/tuned (2-core CPU: ~6 h)
	$(VENV)/bin/mesacli train experiments/icl_softmax7_t224.yaml --run-dir $(RUNS)/icl_softmax7_t224 --no-progress \
		$(TRAIN_ARGS)
	$(VENV)/bin/mesacli prompt-tune $(RUNS)/icl_softmax7_t224 --what both --steps $(TUNE_STEPS) --micro-batch 16 --no-progress
	$(VENV)/bin/mesacli icl-eval $(RUNS)/icl_softmax7_t224 --prompt plain,eos,tuned
	$(VENV)/bin/mesacli icl-eval $(RUNS)/icl_softmax7_t224 --prompt plain,eos,tuned --continual

lint: install
	$(VENV)/bin/ruff check mesacli tests

format: install
	$(VENV)/bin/ruff format mesacli tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The ledger of the paper's results (mesacli reproduce): train / resume what is missing, a budget at a time.
BUDGET ?= 150m
JOBS ?= 2

reproduce: install  ## train and analyse the ledger's entries for BUDGET (resumable, JOBS specs at once), then the report
	$(VENV)/bin/mesacli reproduce run --budget $(BUDGET) --jobs $(JOBS) --no-progress; rc=$$?; \
	$(VENV)/bin/mesacli reproduce report && exit $$rc

report: install  ## results/REPORT.md and results/figures/ from the committed records
	$(VENV)/bin/mesacli reproduce report
