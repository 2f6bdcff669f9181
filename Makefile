# The README's commands. Each builds its venv when it is missing or its requirements changed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo demo-distill test test-fast lint bench docs clean

$(VENV)/.installed: requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Test-only references (PyTorch, diffusers, torch-fidelity, ruff, pytest).
# torch-fidelity without its requirements: they pull torchvision (see requirements-test.txt).
TORCH_FIDELITY := torch-fidelity==0.4.0
$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt Makefile
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps $(TORCH_FIDELITY)
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

# After `make demo`: distil its model into 8- and 4-step students (runs/digits_distill).
demo-distill: $(VENV)/.installed
	$(PY) scripts/demo_distill.py

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .

test: lint docs
	$(PY) -m pytest -q tests

# The tiers a maintainer runs while editing: no multi-process runs, no long training.
test-fast: $(VENV)/.test-installed
	$(PY) -m pytest -q -m "not slow" tests

# BENCH_ARGS: e.g. "--rounds 1 --skip-host --precisions float32" for a quick table.
bench: $(VENV)/.test-installed
	$(PY) scripts/bench_vs_torch.py $(BENCH_ARGS)

# The documentation site (mkdocs.yml, docs/) into site/. Its own small venv: mkdocstrings reads
# the package by static analysis, so neither JAX nor the package is installed there. --strict
# turns every warning (a broken link or anchor, a page missing from the nav, a docstring
# reference to a missing name) into a failure.
DOCS_VENV := .venv-docs
$(DOCS_VENV)/.installed: requirements-docs.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install --quiet -r requirements-docs.txt
	touch $@

docs: $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(DOCS_VENV) site
