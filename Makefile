# Set-up and the jobs users run. Everything installs into .venv at the exact versions of .ci/constraints.txt.
# torch comes first, as the CPU build (the `+cpu` local version), so that no dependency pulls the multi-GB CUDA
# build: pip takes it from the package index when the index has it, or else from PyTorch's CPU wheel index.
# GPU users: install torch for your CUDA first, then `pip install "tilted-priors[all]"` (docs: getting started).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c .ci/constraints.txt
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed
# A second, light environment (the package without extras: numpy, SciPy, matplotlib, ArviZ 1.x; no torch, no JAX)
# runs the backend-free diagnostics tests and doctests under ArviZ 1.x, which needs Python >= 3.12 (the report's
# doctest runs a NumPyro sampler, so it runs in the main environment only). Found on PATH or among
# pyenv's versions.
PY312 ?= $(shell for p in python3.12 python3.13 $$(pyenv root 2>/dev/null)/versions/3.1[23]*/bin/python3; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
AZ1_VENV := .venv-arviz1
AZ1_STAMP := $(AZ1_VENV)/.installed

.PHONY: install test test-suite test-arviz1 check-install docs docs-quick demo bench notebooks clean

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch 2>/dev/null || $(PIP) --index-url $(TORCH_CPU_INDEX) torch
	$(PIP) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(AZ1_STAMP): pyproject.toml .ci/constraints.txt
	test -x $(AZ1_VENV)/bin/python || $(PY312) -m venv $(AZ1_VENV)
	$(AZ1_VENV)/bin/python -m pip install -q --upgrade pip
	$(AZ1_VENV)/bin/python -m pip install -q -c .ci/constraints.txt -e . "arviz==1.*" pytest
	touch $(AZ1_STAMP)

# The suite: tests and doctests (all but those marked slow, which `make test-slow` and CI run) and the documentation
# site in quick mode (tests/docs/test_site.py: the build, tutorials executed), in two pytest-xdist workers, one per
# core (tests/conftest.py gives each one XLA and torch thread); work stealing lets one worker build the site while
# the other runs the rest. Then the diagnostics under ArviZ 1.x.
test: test-suite
ifneq ($(PY312),)
	$(MAKE) test-arviz1
else
	@echo "No Python >= 3.12 found: the diagnostics tests under ArviZ 1.x were skipped"
endif

test-suite: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist worksteal -m "not slow" --durations=10 tests

# The tests marked slow (multi-process training and its kills and resumes, long statistical runs): CI runs them
# after `make test`.
test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist worksteal -m slow tests

test-arviz1: $(AZ1_STAMP)
	$(AZ1_VENV)/bin/pytest -q -p no:cacheprovider tests/inference/test_diagnostics.py tests/test_doctests.py \
		-k "diagnostics and not report"

# Fresh environments with one backend each, from a wheel: the wheel holds one import root, and the README's example
# for each backend runs where the other backend is not installed (CI runs this after `make test`).
check-install: $(STAMP)
	TORCH_CPU_INDEX=$(TORCH_CPU_INDEX) $(PY) .ci/check_install.py

# The documentation site, offline, warnings as errors, the tutorials executed at build time: `make docs` in full
# mode, as the site shows them (docs/_build/html); `make docs-quick` in quick mode, the build the test suite runs.
docs: $(STAMP)
	TILTED_PRIORS_QUICK=0 $(VENV)/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html

docs-quick: $(STAMP)
	TILTED_PRIORS_QUICK=1 $(VENV)/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html-quick

notebooks: $(STAMP)
	$(VENV)/bin/jupyter lab tutorials

demo: $(STAMP)
	$(VENV)/bin/tilted-priors demo --out demo-output

bench: $(STAMP)
	$(PY) benchmarks/samplers.py
	$(PY) benchmarks/diagnostics.py

clean:
	rm -rf $(VENV) $(AZ1_VENV) demo-output prior-demo-output .pytest_cache docs/_build
