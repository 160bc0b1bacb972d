# One-command set-up, demo and tests. Everything is created from scratch in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: venv demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks configs

test: $(STAMP) lint
	$(PY) -m pytest -q -n $(JOBS) --dist loadgroup tests

demo: $(STAMP)
	$(PY) -m densemtl.demo

clean:
	rm -rf $(VENV) runs outputs
