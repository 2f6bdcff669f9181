# The README's commands. Each builds .venv from requirements.txt when it is missing or stale.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export JAX_COMPILATION_CACHE_DIR := $(CURDIR)/.cache/jax
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo test bench clean

$(VENV)/.installed: requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) scripts/bench_vs_torch.py

clean:
	rm -rf $(VENV) .cache
