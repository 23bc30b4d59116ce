# The README's commands. Each creates or reuses .venv and installs the project first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test bench lint sample models browser

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
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check pipeline flows tests bench

sample: setup      ## re-render pipeline/demo_profile (deterministic)
	$(PY) -m clipgram.demo

models: setup      ## retrain the offline models and rewrite their shipped weights (pipeline/models/weights)
	$(PY) -m clipgram.models.tiny

# Chromium for tests/test_report_browser.py. Installs only as root with apt-get (CI); elsewhere it
# says so and succeeds: those tests then skip, the rest of `make test` is unaffected.
browser:           ## headless Chromium for the results-page tests (Debian, as root)
	@if command -v chromium >/dev/null; then \
	  echo "chromium is installed: $$(chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium fonts-dejavu-core; \
	else \
	  echo "chromium is missing and cannot be installed here (needs root and apt-get):" \
	       "the browser tests will skip; install it with: sudo apt-get install chromium"; \
	fi
