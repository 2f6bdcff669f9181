# The README's commands. Each builds its venv when it is missing or its requirements changed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo demo-distill test test-fast test-compat lint bench docs clean

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

# The first demo's VP model (configs/digits_vp.py, trained into runs/digits_vp when missing)
# distilled into 8- and 4-step students (runs/digits_distill).
demo-distill: $(VENV)/.installed
	$(PY) scripts/demo_distill.py

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .

test: lint docs
	$(PY) -m pytest -q tests

# The tiers a maintainer runs while editing: no multi-process runs, no long training.
test-fast: $(VENV)/.test-installed
	$(PY) -m pytest -q -m "not slow" tests

# The fast tier on Python 3.12 with the newest releases of the stack that install together
# (requirements-compat.txt, unpinned), in its own venv, rebuilt from scratch when its inputs change.
# pyenv's shim answers `python3.12` only where 3.12 is the selected version: ask pyenv for it.
PYTHON_COMPAT ?= $(shell PYENV_VERSION=3.12 pyenv which python3.12 2>/dev/null || echo python3.12)
VENV_COMPAT := .venv-compat
COMPAT_VERSIONS := jax jaxlib flax optax orbax-checkpoint grain tensorflow-datasets numpy \
	tensorboardX tensorflow-cpu
$(VENV_COMPAT)/.installed: requirements-compat.txt pyproject.toml
	@command -v $(PYTHON_COMPAT) >/dev/null || { echo "error: $(PYTHON_COMPAT) not found; install Python 3.12 or run make test-compat PYTHON_COMPAT=/path/to/python3.12"; exit 1; }
	rm -rf $(VENV_COMPAT)
	$(PYTHON_COMPAT) -m venv $(VENV_COMPAT)
	$(VENV_COMPAT)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_COMPAT)/bin/python -m pip install --quiet -r requirements-compat.txt -e '.[tfds]'
	touch $@

test-compat: $(VENV_COMPAT)/.installed
	@$(VENV_COMPAT)/bin/python -c "import importlib.metadata as m, sys; print('test-compat: Python', \
		sys.version.split()[0], *(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $(COMPAT_VERSIONS)
	$(VENV_COMPAT)/bin/python -m pytest -q -m "not slow" tests

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
	rm -rf $(VENV) $(VENV_COMPAT) $(DOCS_VENV) site
