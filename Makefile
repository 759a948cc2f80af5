# Set-up and the two jobs users run. Everything installs into .venv; torch comes first, as the CPU build,
# so that no dependency pulls the multi-GB CUDA build.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A second, light environment (numpy, scipy, matplotlib, ArviZ 1.x; no torch, no JAX) runs the backend-free
# diagnostics tests under ArviZ 1.x, which needs Python >= 3.12. Found on PATH or among pyenv's versions.
PY312 ?= $(shell for p in python3.12 python3.13 $$(pyenv root 2>/dev/null)/versions/3.1[23]*/bin/python3; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
AZ1_VENV := .venv-arviz1
AZ1_STAMP := $(AZ1_VENV)/.installed

.PHONY: install test test-arviz1 demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(AZ1_STAMP):
	$(PY312) -m venv $(AZ1_VENV)
	$(AZ1_VENV)/bin/python -m pip install -q --upgrade pip
	$(AZ1_VENV)/bin/python -m pip install -q numpy scipy matplotlib "arviz==1.3.0" "pytest>=8"
	touch $(AZ1_STAMP)

# Two pytest-xdist workers, one per core (tests/conftest.py gives each one XLA and torch thread).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --doctest-modules tests tilted_priors inference models
ifneq ($(PY312),)
	$(MAKE) test-arviz1
else
	@echo "No Python >= 3.12 found: the diagnostics tests under ArviZ 1.x were skipped"
endif

test-arviz1: $(AZ1_STAMP)
	PYTHONPATH=. $(AZ1_VENV)/bin/python -m pytest -q -p no:cacheprovider --doctest-modules \
		tests/inference/test_diagnostics.py inference/diagnostics/arrays.py inference/diagnostics/data.py \
		inference/diagnostics/plots.py

demo: $(STAMP)
	$(PY) -m models demo --out demo-output

bench: $(STAMP)
	$(PY) benchmarks/samplers.py
	$(PY) benchmarks/diagnostics.py

clean:
	rm -rf $(VENV) $(AZ1_VENV) demo-output .pytest_cache
