# Two entry points, both usable on a fresh machine:
#   make book  - create .venv if missing, install, execute every chapter, build _build/html
#   make test  - the same set-up, then unit tests + nbval over every chapter + the book build
SHELL := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.entmath-installed
NBDIR  := _build/nbval
# Chapters are MyST notebooks (the single source of truth); nbval only reads .ipynb, so
# `nbval` converts them into $(NBDIR) first.
CHAPTERS := $(sort $(wildcard book/ch*.md))
# No GPU here: Triton kernels run on the CPU through Triton's interpreter.
export TRITON_INTERPRET ?= 1
export PYTHONPATH := $(CURDIR)/book$(if $(PYTHONPATH),:$(PYTHONPATH))
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.PHONY: install book test unit nbval clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $@

install: $(STAMP)

book: $(STAMP)
	rm -rf _build/html _build/jupyter_execute _build/.doctrees
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going --all
	@test -f _build/html/index.html

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

nbval: $(STAMP)
	rm -rf $(NBDIR) && mkdir -p $(NBDIR)
	for ch in $(CHAPTERS); do \
	  $(BIN)/jupytext --quiet --to ipynb -o $(NBDIR)/$$(basename $${ch%.md}).ipynb $$ch || exit 1; \
	done
	$(BIN)/python -m pytest --nbval-lax -q -p no:cacheprovider --nbval-cell-timeout=600 $(NBDIR)

test: unit nbval book

clean:
	rm -rf _build
