# make test : create .venv when missing, install the pinned requirements and run the test suite.
# make demo : train and evaluate on the synthetic shapes dataset on the CPU (see README).
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
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
