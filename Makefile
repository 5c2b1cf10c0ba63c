# Two commands, both set up what they need on a fresh machine:
#   make book   builds the HTML book (executing every chapter) into _build/html
#   make test   runs the unit tests and checks every chapter's run: it reuses the notebooks
#               the last `make book` executed when they are current, else executes them
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One torch thread: on small shared machines two threads ran 10-50x slower.
export OMP_NUM_THREADS ?= 1
export DGREF_PROGRESS ?= 0
# Make kernels resolve to this venv, not a user-level kernelspec elsewhere.
export JUPYTER_PATH := $(abspath $(VENV))/share/jupyter
# What the build ran against (tests/_bookfiles.py: book_inputs); kept only for a build that
# passed, so that `make test` may reuse its executed notebooks.
BOOK_RECORD := _build/book-inputs.json
# Chapters executed side by side by `make book` (one torch thread each).
BOOK_WORKERS ?= 2
# pytest-xdist: two workers, one group per test file and per chapter (tests/conftest.py).
PYTEST_WORKERS ?= 2

.PHONY: setup book test bench mutate clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Every chapter is executed on every `make book`, BOOK_WORKERS at a time, into a fresh
# jupyter-cache; the build then renders those runs (the generated config is _config.yml with
# execute_notebooks: cache on that cache; --all: a fresh Sphinx environment, every page read).
# A chapter that failed is not cached: jupyter-book runs it again and reports it under -W.
book: setup
	rm -rf $(BOOK_RECORD) _build/.jupyter_cache
	$(BIN)/python tests/_bookfiles.py --record-inputs $(BOOK_RECORD).new \
	    --execute-into _build/.jupyter_cache --config-out _build/book-config.yml --workers $(BOOK_WORKERS)
	$(BIN)/jupyter-book build . -W --keep-going --all --config _build/book-config.yml
	mv $(BOOK_RECORD).new $(BOOK_RECORD)

test: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

bench: setup
	$(BIN)/python benchmarks/run.py

# Mutation testing (tools/mutate.py); slow, not part of `test` or CI.
mutate: setup
	$(BIN)/python tools/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf _build
