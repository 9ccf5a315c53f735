# make demo : set everything up (a virtual environment in .venv) and run the demo job on the CPU
# make test : set everything up and run the test suite (what CI runs, through .ci/run)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench

setup: $(VENV)/.installed

# torch==2.13.0 first: that pin takes the CPU wheel; a bare `torch` would pull a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/komt-batch run jobs/demo.yaml

test: setup
	$(PY) -m pytest

bench: setup
	$(VENV)/bin/komt-batch bench jobs/bench.yaml
