# Set-up and the two jobs users run. Everything installs into .venv; torch comes first, as the CPU build,
# so that no dependency pulls the multi-GB CUDA build.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --doctest-modules tests tilted_priors inference models

demo: $(STAMP)
	$(PY) -m models demo --out demo-output

bench: $(STAMP)
	$(PY) benchmarks/samplers.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
