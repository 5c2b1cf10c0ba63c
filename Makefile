# Two commands, both set up what they need on a fresh machine:
#   make book   builds the HTML book (executing every chapter) into _build/html
#   make test   runs the unit tests and every chapter under nbval
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One torch thread: on small shared machines two threads ran 10-50x slower.
export OMP_NUM_THREADS ?= 1
export DGREF_PROGRESS ?= 0
# Make kernels resolve to this venv, not a user-level kernelspec elsewhere.
export JUPYTER_PATH := $(abspath $(VENV))/share/jupyter

.PHONY: setup book test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

book: setup
	$(BIN)/jupyter-book build . -W --keep-going

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf _build
