# make test : create .venv when missing, install the pinned requirements and run the test suite.
# make demo : train and evaluate on the synthetic shapes dataset on the CPU (see README).
# The newest Python >= 3.12 that runs (a pyenv shim may exist and fail, hence the test run), else
# python3 (3.11 gets jax 0.10, see requirements.txt). Override with PYTHON=/path/to/python.
PYTHON ?= $(shell for p in python3.13 python3.12; do \
  $$p -c 'import sys' >/dev/null 2>&1 && { command -v $$p; exit 0; }; done; command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2
DEMO_DIR ?= /tmp/maskrcnn_shapes_demo

.PHONY: install test demo clean

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

demo: $(VENV)/.installed
	PYTHON=$(PY) bash launch/demo.sh $(DEMO_DIR)

clean:
	rm -rf $(VENV) .pytest_cache
