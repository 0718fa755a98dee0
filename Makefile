# mesacli developer targets. `make run` and `make test` install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow lint format clean bench

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

bench: install  ## compare attention kernels (time, memory); writes bench.json (several minutes on a CPU)
	$(VENV)/bin/mesacli bench --out bench.json

lint: install
	$(VENV)/bin/ruff check mesacli tests

format: install
	$(VENV)/bin/ruff format mesacli tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
