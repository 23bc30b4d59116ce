# The README's commands. Each creates or reuses .venv and installs the project first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test bench lint sample

setup: $(STAMP)

# reinstall only when the dependencies change
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup        ## ingest the embedded sample profile through the Prefect flow, then search it
	$(VENV)/bin/clipgram demo

test: setup        ## the offline test suite
	$(PY) -m pytest -q

bench: setup       ## throughput figures, written to bench/results.json
	$(PY) -m pipeline.bench

lint: setup
	$(VENV)/bin/ruff check pipeline flows tests

sample: setup      ## re-render pipeline/demo_profile (deterministic)
	$(PY) -m pipeline.demo
