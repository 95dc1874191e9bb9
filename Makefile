# Two commands do all the set-up on a fresh machine (Python 3.11, CPU):
#   make quickstart   # builds .venv, then trains IT and IM on a tiny local model and prints the loss table
#   make test         # builds .venv, then runs the test suite
# Both create the environment in .venv at the repo root the first time (~5 minutes).

PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export AXOLOTL_DO_NOT_TRACK := 1
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: quickstart test test-slow test-all bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, from the CPU wheel: a plain `torch` requirement would pull GBs of CUDA.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[train,eval,test]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m instruction_modelling.quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
